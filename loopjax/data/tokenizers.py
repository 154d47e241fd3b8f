"""Tokenizers: one protocol, four offline implementations, and a spec parser.

Specs accepted by `make_tokenizer` (the `config.data.tokenizer` string):
  "byte"                      UTF-8 bytes 0..255 plus EOS = 256 (vocab_size 257)
  "sentencepiece:PATH.model"  a local SentencePiece model
  "hf:PATH/tokenizer.json"    a local Hugging Face `tokenizers` file (or hf:FOLDER holding one)
  "hf:ID" or "ID"             the tokenizer.json of the Hub model repository ID (`gpt2`,
                              `bert-base-uncased`, `ORG/NAME`), from the Hugging Face cache
                              first (loopjax.hf.hub: downloaded only when the Hub is reachable
                              and HF_HUB_OFFLINE is not set); a repository without one gets
                              the tokenizer transformers reads from its other files

`CharTokenizer` serves the built-in tasks (Sudoku, arithmetic). A local path always wins over a
Hub id of the same spelling.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from loopjax.hf import hub


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline, samplers and export need from a tokenizer."""

  vocab_size: int        # ids are in [0, vocab_size); the model's [MASK] id is vocab_size
  eos_id: int | None     # document separator used by packing (None: no separator)
  pad_id: int | None     # id stored at padding positions (None: use eos_id, then 0)

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def describe(self) -> dict: ...           # JSON-able; includes "type" and "vocab_size"
  def files(self) -> list[str]: ...         # local files to copy when exporting


def fill_id(tok: Tokenizer) -> int:
  """The token id written at padding positions."""
  if tok.pad_id is not None:
    return tok.pad_id
  return tok.eos_id if tok.eos_id is not None else 0


def bos_id(tok: Tokenizer) -> int | None:
  """The id that opens a row in MDLM's wrap: the tokenizer's BOS ([CLS], <s>, <bos>), else
  its EOS (GPT-2 uses <|endoftext|> for both)."""
  if isinstance(tok, HFTokenizer):
    for t in _HF_BOS:
      i = tok._tok.token_to_id(t)
      if i is not None:
        return int(i)
  if isinstance(tok, SentencePieceTokenizer) and tok._sp.bos_id() >= 0:
    return int(tok._sp.bos_id())
  return tok.eos_id


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _require_file(path: str, spec: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"tokenizer spec {spec!r}: file {path!r} does not exist (give a local path, or a Hub "
        "model id such as hf:gpt2)")
  return path


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255 and EOS = 256; decoding drops EOS and repairs bad UTF-8."""

  vocab_size = 257
  eos_id = 256
  pad_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", "replace")

  def describe(self) -> dict:
    return {"type": "byte", "spec": "byte", "vocab_size": self.vocab_size,
            "eos_id": self.eos_id, "pad_id": self.pad_id}

  def files(self) -> list[str]:
    return []


class CharTokenizer:
  """One id per character of `alphabet` (id = position); `pad` (a character) if any."""

  def __init__(self, alphabet: str, *, pad: str | None = None, name: str = "chars"):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError(f"alphabet {alphabet!r} has repeated characters")
    if pad is not None and pad not in alphabet:
      raise ValueError(f"pad {pad!r} is not in alphabet {alphabet!r}")
    self.alphabet, self.name = alphabet, name
    self._ids = {c: i for i, c in enumerate(alphabet)}
    self.vocab_size = len(alphabet)
    self.pad_id = None if pad is None else self._ids[pad]
    self.eos_id = None

  def encode(self, text: str) -> list[int]:
    try:
      return [self._ids[c] for c in text]
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in alphabet {self.alphabet!r}") from None

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.alphabet[int(i)] if 0 <= int(i) < self.vocab_size else "?"
                   for i in ids)

  def describe(self) -> dict:
    return {"type": "chars", "name": self.name, "alphabet": self.alphabet,
            "vocab_size": self.vocab_size, "pad_id": self.pad_id, "eos_id": None}

  def files(self) -> list[str]:
    return []


class SentencePieceTokenizer:
  """A local SentencePiece `.model` file."""

  def __init__(self, path: str):
    import sentencepiece as spm
    self.path = _require_file(path, f"sentencepiece:{path}")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"sentencepiece:{self.path} is not a SentencePiece model file ("
                       f"{str(e).strip().splitlines()[0][:200]}); train one with `loopjax "
                       "spm-train` or point data.tokenizer at a valid .model file") from None
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  def describe(self) -> dict:
    return {"type": "sentencepiece", "spec": f"sentencepiece:{self.path}",
            "file": os.path.basename(self.path), "sha256": _sha256(self.path),
            "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}

  def files(self) -> list[str]:
    return [self.path]


_HF_EOS = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "<|eos|>")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>")
_HF_BOS = ("[CLS]", "<s>", "<bos>", "<|bos|>", "<|startoftext|>")


class HFTokenizer:
  """A local Hugging Face `tokenizer.json`; special tokens are never added by `encode`.

  EOS is the first of <|endoftext|>, </s>, [SEP], <eos>, <|eos|> present in the vocabulary
  (or `eos_token`); PAD likewise from <pad>, [PAD], <|pad|> (or `pad_token`).
  """

  def __init__(self, path: str, *, eos_token: str | None = None,
               pad_token: str | None = None, repo_id: str | None = None):
    import tokenizers
    self.path = _require_file(path, f"hf:{repo_id or path}")
    self.repo_id = repo_id  # the Hub id it was resolved from (path: the cached file)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # the Rust library raises its own exception type for any bad file
      raise ValueError(f"hf:{self.path} is not a Hugging Face tokenizer.json ("
                       f"{str(e).strip().splitlines()[0][:200]})") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.eos_id = self._find(eos_token, _HF_EOS)
    self.pad_id = self._find(pad_token, _HF_PAD)

  def _find(self, explicit: str | None, candidates: Sequence[str]) -> int | None:
    for t in ([explicit] if explicit else candidates):
      i = self._tok.token_to_id(t)
      if i is not None:
        return int(i)
    if explicit:
      raise ValueError(f"token {explicit!r} is not in {self.path}")
    return None

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size],
                            skip_special_tokens=True)

  def describe(self) -> dict:
    hub_ref = {"repo_id": self.repo_id, "revision": hub.snapshot_revision(self.path)} \
        if self.repo_id else {}
    return {"type": "hf", "spec": f"hf:{self.repo_id or self.path}",
            "file": os.path.basename(self.path), "sha256": _sha256(self.path),
            "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id,
            **({"hub": hub_ref} if hub_ref else {})}

  def files(self) -> list[str]:
    return [self.path]


def make_tokenizer(spec: str) -> Tokenizer:
  """Builds a tokenizer from a spec string (see the module docstring)."""
  spec = (spec or "byte").strip()
  kind, _, path = spec.partition(":")
  if kind == "byte" and not path:
    return ByteTokenizer()
  if kind in ("sentencepiece", "spm") and path:
    return SentencePieceTokenizer(os.path.expanduser(path))
  if kind == "hf" and path:
    if hub.is_repo_id(path):
      return hub_tokenizer(path)
    local = os.path.expanduser(path)
    if os.path.isdir(local):  # a save_pretrained folder or a local copy of a Hub repository
      local = os.path.join(local, "tokenizer.json")
    return HFTokenizer(local)
  if not path and hub.is_repo_id(spec):
    return hub_tokenizer(spec)
  raise ValueError(f"unknown tokenizer spec {spec!r}; use 'byte', "
                   "'sentencepiece:PATH.model', 'hf:PATH/tokenizer.json' or a Hub model id "
                   "('hf:gpt2', 'bert-base-uncased')")


def hub_tokenizer(repo_id: str) -> HFTokenizer:
  """The tokenizer.json of a Hub model repository (cache first; see loopjax.hf.hub); for a
  repository without one, the tokenizer transformers reads from its other files."""
  path = hub.hub_file(repo_id, "tokenizer.json", what="tokenizer",
                      absent_ok="tokenizer_config.json")
  return HFTokenizer(path or hub.converted_tokenizer(repo_id), repo_id=repo_id)


def train_sentencepiece(input_files: Sequence[str], model_prefix: str, vocab_size: int,
                        *, model_type: str = "unigram", character_coverage: float = 1.0,
                        **trainer_kwargs) -> str:
  """Trains a SentencePiece model on local text files; returns the `.model` path.

  Special ids: unk 0, eos 1, pad 2, no bos. Extra `trainer_kwargs` go to
  `SentencePieceTrainer.train` (e.g. `input_sentence_size`, `hard_vocab_limit=False`).
  """
  import sentencepiece as spm
  for f in input_files:
    _require_file(f, f"train_sentencepiece input {f}")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  kwargs = dict(input=",".join(input_files), model_prefix=model_prefix,
                vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, unk_id=0, eos_id=1, pad_id=2,
                bos_id=-1, minloglevel=2)
  kwargs.update(trainer_kwargs)
  spm.SentencePieceTrainer.train(**kwargs)
  return model_prefix + ".model"
