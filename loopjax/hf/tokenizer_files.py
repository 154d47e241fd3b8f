"""The export's top-level tokenizer files for `AutoTokenizer.from_pretrained(export)`.

Written with the `tokenizers` library alone (no transformers needed to export): `tokenizer.json`,
`tokenizer_config.json` (class PreTrainedTokenizerFast) and `special_tokens_map.json`. Every
kind of loopjax tokenizer gets a tokenizer.json with the same ids as loopjax's `encode`, plus the
mask token `[MASK]` at id vocab_size (the model's mask id):
  hf             the run's tokenizer.json with [MASK] added
  byte           a byte-level BPE without merges: byte b is id b, `<eos>` is 256
  chars          (built-in tasks) a WordLevel vocabulary of single characters
  sentencepiece  unigram models: a Unigram tokenizer.json from the model's pieces and
                 normalizer; BPE / word / char SentencePiece models get none (the .model file
                 in tokenizer/ still loads with `sentencepiece`)
Encode with `add_special_tokens=False` to get loopjax's ids (a copied tokenizer.json may carry a
post-processor that adds BOS/EOS, which loopjax's pipeline does not apply per text).
"""

from __future__ import annotations

import json
import os
import warnings

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

MASK_TOKEN = "[MASK]"
MASK_FALLBACK = "<|mdm_mask|>"  # when the vocabulary already uses "[MASK]" for another id


def _gpt2_table() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_tokenizer() -> Tokenizer:
  vocab = {ch: b for b, ch in _gpt2_table().items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<eos>"])
  return tok


def _char_tokenizer(alphabet: str) -> Tokenizer:
  tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(alphabet)}))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  return tok


def _sentencepiece_tokenizer(path: str) -> Tokenizer | None:
  """A Unigram tokenizer.json equivalent to a unigram SentencePiece model (None otherwise)."""
  try:
    from sentencepiece import sentencepiece_model_pb2 as pb2  # needs protobuf
  except ImportError:
    return None
  proto = pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  if proto.trainer_spec.model_type != 1:  # 1 = UNIGRAM
    return None
  vocab = [(p.piece, p.score) for p in proto.pieces]
  tok = Tokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id,
                                 proto.trainer_spec.byte_fallback))
  norm = [normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)] \
      if proto.normalizer_spec.precompiled_charsmap else []
  tok.normalizer = normalizers.Sequence(norm + [normalizers.Replace(Regex(" {2,}"), " ")])
  scheme = "always" if proto.normalizer_spec.add_dummy_prefix else "never"
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
  control = [p.piece for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
  tok.add_special_tokens(control)
  return tok


def hf_tokenizer(tok, describe: dict) -> Tokenizer | None:
  """The `tokenizers.Tokenizer` with loopjax's ids for a loopjax tokenizer (None: no form)."""
  kind = describe["type"]
  if kind == "hf":
    return Tokenizer.from_file(tok.path)
  if kind == "byte":
    return _byte_tokenizer()
  if kind == "chars":
    return _char_tokenizer(describe["alphabet"])
  if kind == "sentencepiece":
    return _sentencepiece_tokenizer(tok.path)
  return None


def write_tokenizer_files(out_dir: str, tok, *, max_length: int) -> list[str]:
  """Writes the top-level tokenizer files for `tok` (a loopjax Tokenizer); returns their names
  ([] with a warning when this kind of tokenizer has no tokenizer.json form)."""
  describe = tok.describe()
  hf = hf_tokenizer(tok, describe)
  if hf is None:
    warnings.warn(f"the {describe['type']} tokenizer has no tokenizer.json form here; the export "
                  "gets no top-level tokenizer for AutoTokenizer (tokenizer/ keeps the original)")
    return []
  vocab = int(tok.vocab_size)
  if hf.get_vocab_size(with_added_tokens=True) != vocab:
    raise ValueError(f"tokenizer.json of the {describe['type']} tokenizer has "
                     f"{hf.get_vocab_size(with_added_tokens=True)} ids, loopjax's has {vocab}")
  mask = MASK_TOKEN if hf.token_to_id(MASK_TOKEN) is None else MASK_FALLBACK
  hf.add_special_tokens([mask])
  if hf.token_to_id(mask) != vocab:
    raise ValueError(f"{mask} got id {hf.token_to_id(mask)}, the model's mask id is {vocab}")
  special = {"mask_token": mask}
  for key, i in (("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
    if i is not None and hf.id_to_token(int(i)) is not None:
      special[key] = hf.id_to_token(int(i))
  unk = getattr(hf.model, "unk_token", None)
  if isinstance(unk, str) and hf.token_to_id(unk) is not None:
    special["unk_token"] = unk
  hf.save(os.path.join(out_dir, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(max_length),
            "clean_up_tokenization_spaces": False, **special}
  for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2)
  return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
