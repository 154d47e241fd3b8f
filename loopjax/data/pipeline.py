"""Grain pipelines: the training iterator, held-out evaluation batches, and config.

Global row r of training step k is row k*G + r of one deterministic stream (G = global
batch size); process p of P gets rows [p*G/P, (p+1)*G/P) of every global batch. So the
per-process batches, concatenated in process order, are exactly the one-process batch.

Row streams:
  sudoku / arithmetic   row i = example i of the training partition, generated from
                        (data seed, i); evaluation uses the disjoint held-out partition.
  prompt_answer         GSM8K-format JSONL pairs (prompt_answer.py), one example per row,
                        shuffled per epoch and repeated; held out: `eval_examples` fixed pairs.
  prepared              token shards of `loopjax prepare` (prepared.py), local or gs://: each
                        row's slot reads its own range of the documents (shards in a new
                        order each epoch, windows of documents shuffled), packed with MDLM's
                        wrap or per-document attention; held out: the held-out split in order.
  text / tfds           documents shuffled per epoch (grain index shuffle), repeated forever,
                        tokenized, then packed (see packing.py) or one padded doc per row.
                        Held out: `eval_examples` fixed documents (text) or `eval_split` (tfds).
The data seed is `data.shuffle_seed` if set, else the `seed` argument.

Each function taking a data config also takes a `DataSpec` (the section resolved with its
tokenizer and prepared manifest loaded once) and then reuses what it holds.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from types import SimpleNamespace

import grain
import ml_collections
from grain.experimental import ThreadPrefetchIterDataset
from ml_collections import config_dict

from loopjax import storage
from loopjax.data import (arithmetic, heldout, packing, prepared, prompt_answer, sudoku, text,
                          tfds_source)
from loopjax.data.batch import slice_rows, stack_rows
from loopjax.data.iterator import DataIterator
from loopjax.data.tokenizers import Tokenizer, fill_id, make_tokenizer

SOURCES = ("sudoku", "arithmetic", "text", "tfds", "prompt_answer", "prepared")
_SYNTHETIC = ("sudoku", "arithmetic")
# Rows of an endless training stream. Not sys.maxsize (grain's `repeat()`): grain computes the
# length of a one-row batch of that beyond Py_ssize_t, which a process loading one row per
# pipeline shard would hit.
_ENDLESS = 2**62


def _endless(ds: grain.MapDataset) -> grain.MapDataset:
  """`ds` repeated (in the same order every epoch) to about _ENDLESS elements."""
  return ds.repeat(max(1, _ENDLESS // max(1, len(ds))))


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` section with every key and its default."""
  return ml_collections.ConfigDict(dict(
      source="sudoku",          # sudoku | arithmetic | text | tfds | prompt_answer | prepared
      seq_len=81,               # L; must be 81 for sudoku
      # sudoku
      min_givens=25, max_givens=40,
      # arithmetic
      max_digits=3, ops="+",    # ops: any of "+", "+-", "+-*"
      # text (local files)
      paths="",                 # comma-separated .txt / .jsonl / .parquet files (or a list)
      text_field="text",        # jsonl field / parquet column / TFDS feature
      txt_split="paragraph",    # .txt documents: "paragraph" (blank-line separated) | "line"
      # prompt_answer (GSM8K format; reads data.paths)
      prompt_field="question", answer_field="answer",
      prompt_template="Question: {question}\nAnswer:",  # as loopjax eval --gsm8k
      answer_len=128,           # answer + EOS padding positions after the prompt (all scored)
      tokenizer="byte",         # byte | sentencepiece:PATH.model | hf:PATH/tokenizer.json
      # tfds
      name="lm1b", data_dir=config_dict.placeholder(str), split="train",
      eval_split="test", download=False,
      # prepared (token shards of `loopjax prepare`)
      path="",                  # the prepared corpus directory (holds manifest.json)
      wrap="mdlm",              # mdlm: BOS..EOS rows across documents | document: per-doc
      workers=0,                # grain worker processes packing rows (0: in this process)
      shuffle_window=256,       # documents read at once by a row and shuffled among themselves
      stage_dir="",             # gs:// corpora: local folder for shard copies ("": $TMPDIR)
      verify_shards=False,      # also check every shard's sha256 at open (reads the corpus)
      # rows
      packing=False,            # concatenate-and-chunk text with EOS between documents
      document_attention=True,  # segment_ids number documents; False: 1 for all non-padding
      shuffle_seed=config_dict.placeholder(int),  # None: use the trainer's seed
      eval_examples=1000,       # text / prompt_answer: documents or pairs held out
      num_threads=2,            # grain reader threads (row streams)
      prefetch=4,               # batches prefetched in the background (0: off)
  ))


def _resolve(data_cfg) -> SimpleNamespace:
  """Defaults overlaid with `data_cfg`; unknown keys are an error (typos)."""
  if isinstance(data_cfg, DataSpec):
    return data_cfg.section
  cfg = default_data_config().to_dict()
  given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  unknown = sorted(set(given) - set(cfg))
  if unknown:
    raise ValueError(f"unknown config.data keys {unknown}; known: {sorted(cfg)}")
  cfg.update(given)
  c = SimpleNamespace(**cfg)
  if c.source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {c.source!r}")
  if c.seq_len < 1:
    raise ValueError(f"data.seq_len must be positive, got {c.seq_len}")
  if c.packing and c.source not in ("text", "tfds", "prepared"):  # prepared: always packed
    raise ValueError(f"data.packing applies to text/tfds sources, not {c.source!r}")
  if c.source == "prompt_answer" and not 0 < c.answer_len < c.seq_len:
    raise ValueError(f"data.answer_len must be in (0, data.seq_len={c.seq_len}) so a prompt "
                     f"fits before the answer, got {c.answer_len}")
  if c.source == "prepared":
    if not c.path:
      raise ValueError("data.source='prepared' needs data.path: the directory `loopjax prepare "
                       "--out DIR` wrote")
    if c.wrap not in prepared.WRAPS:
      raise ValueError(f"data.wrap must be one of {prepared.WRAPS}, got {c.wrap!r}")
    if c.workers < 0:
      raise ValueError(f"data.workers must be >= 0, got {c.workers}")
    if c.shuffle_window < 1:
      raise ValueError(f"data.shuffle_window must be >= 1 documents, got {c.shuffle_window}")
  if c.source == "sudoku":
    if c.seq_len != sudoku.SUDOKU_LEN:
      raise ValueError(f"sudoku rows are 81 cells: set data.seq_len=81 (got {c.seq_len})")
    if not 0 <= c.min_givens <= c.max_givens <= 80:
      raise ValueError("need 0 <= data.min_givens <= data.max_givens <= 80, got "
                       f"{c.min_givens}, {c.max_givens}")
  if c.source == "arithmetic":
    need = arithmetic.required_seq_len(c.max_digits, c.ops)
    if c.seq_len < need:
      raise ValueError(f"data.seq_len={c.seq_len} is too short for max_digits="
                       f"{c.max_digits}, ops={c.ops!r}: need at least {need}")
  return c


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A run's data, resolved once: the section (defaults filled in, validated), its tokenizer
  and, for a prepared corpus, its manifest checked against that tokenizer. The tokenizer and the
  manifest are read on first access and kept (functools.cached_property), so a command that never
  needs them (FLOP counting, a memory estimate with the vocabulary configured) reads no file."""
  section: SimpleNamespace

  @classmethod
  def load(cls, data_cfg) -> "DataSpec":
    if isinstance(data_cfg, DataSpec):
      return data_cfg
    return cls(_resolve(data_cfg))

  @functools.cached_property
  def tokenizer(self) -> Tokenizer:
    c = self.section
    if c.source == "sudoku":
      return sudoku.sudoku_tokenizer()
    if c.source == "arithmetic":
      return arithmetic.arithmetic_tokenizer()
    return make_tokenizer(c.tokenizer)

  @functools.cached_property
  def manifest(self) -> dict | None:
    c = self.section
    if c.source != "prepared":
      return None
    tok = self.tokenizer
    storage.check_client(c.path)  # a gs:// corpus: a missing client named first
    return prepared.open_manifest(c.path, tok)

  @property
  def vocab_size(self) -> int:
    """The tokenizer's vocabulary, checked against a prepared corpus's manifest (a corpus
    prepared with another tokenizer holds ids of another vocabulary)."""
    self.manifest  # pylint: disable=pointless-statement
    return self.tokenizer.vocab_size


def tokenizer_for(data_cfg) -> Tokenizer:
  """The tokenizer of the configured source (character vocabularies for built-in tasks)."""
  return DataSpec.load(data_cfg).tokenizer


def data_vocab_size(data_cfg) -> int:
  """Token ids the data can produce are < this; the model's [MASK] id is this value."""
  return DataSpec.load(data_cfg).vocab_size


def _data_seed(c: SimpleNamespace, seed: int) -> int:
  s = c.shuffle_seed if c.shuffle_seed is not None else seed
  if s is None or int(s) < 0:
    raise ValueError(f"the data seed must be a non-negative int, got {s!r}")
  return int(s)


def _synthetic_row(index: int, *, c: SimpleNamespace, seed: int, heldout_split: bool):
  if c.source == "sudoku":
    return sudoku.sudoku_example(seed, index, min_givens=c.min_givens,
                                 max_givens=c.max_givens, heldout_split=heldout_split)
  return arithmetic.arithmetic_example(seed, index, max_digits=c.max_digits, ops=c.ops,
                                       seq_len=c.seq_len, heldout_split=heldout_split)


def _paths(c: SimpleNamespace) -> list[str]:
  """data.paths: a comma-separated string or a list."""
  return [p for p in c.paths.split(",") if p] if isinstance(c.paths, str) else list(c.paths)


def _documents(c: SimpleNamespace, *, train: bool):
  """The train or held-out documents (a sequence of str) of a text/tfds source."""
  if c.source == "tfds":
    split = c.split if train else c.eval_split
    src = tfds_source.open_tfds_source(c.name, split=split, data_dir=c.data_dir,
                                       download=c.download)
    return tfds_source.TfdsDocuments(src, c.text_field, name=c.name)
  docs = text.read_documents(_paths(c), text_field=c.text_field, txt_split=c.txt_split)
  train_idx, heldout_idx = heldout.split_documents(len(docs), c.eval_examples)
  return [docs[i] for i in (train_idx if train else heldout_idx)]


def _pair_rows(c: SimpleNamespace, tok: Tokenizer, *, train: bool) -> list[dict]:
  """The train or held-out rows of a prompt_answer source, encoded."""
  pairs = prompt_answer.read_pairs(_paths(c), prompt_field=c.prompt_field,
                                   answer_field=c.answer_field)
  train_idx, heldout_idx = heldout.split_documents(len(pairs), c.eval_examples)
  return prompt_answer.encode_pairs(
      tok, [pairs[i] for i in (train_idx if train else heldout_idx)], seq_len=c.seq_len,
      answer_len=c.answer_len, template=c.prompt_template, prompt_field=c.prompt_field,
      answer_field=c.answer_field)


def _local_rows(global_batch_size: int, process_index: int, process_count: int):
  if global_batch_size < 1 or process_count < 1:
    raise ValueError(f"need a positive batch size and process count, got "
                     f"{global_batch_size}, {process_count}")
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return global_batch_size // process_count


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> DataIterator:
  """Infinite, deterministic, resumable iterator of this process's training batches."""
  spec = DataSpec.load(data_cfg)
  c, tok = spec.section, spec.tokenizer
  local = _local_rows(global_batch_size, process_index, process_count)
  dseed = _data_seed(c, seed)
  fingerprint = dict(source=c.source, seq_len=c.seq_len, seed=dseed,
                     global_batch_size=global_batch_size, process_index=process_index,
                     process_count=process_count, packing=bool(c.packing),
                     document_attention=bool(c.document_attention),
                     vocab_size=tok.vocab_size)
  rows = None
  if c.source == "prepared":
    manifest = spec.manifest
    fingerprint.update(corpus=prepared.corpus_fingerprint(manifest), wrap=c.wrap,
                       shuffle_window=c.shuffle_window)
    ds = prepared.train_batches(c.path, manifest, seq_len=c.seq_len, wrap=c.wrap, seed=dseed,
                                global_batch_size=global_batch_size,
                                first_row=process_index * local, num_rows=local,
                                workers=c.workers, window=c.shuffle_window,
                                verify=c.verify_shards, stage_dir=c.stage_dir)
    if c.prefetch > 0:
      ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=c.prefetch)
    return DataIterator(iter(ds), fingerprint=fingerprint)
  if c.source in _SYNTHETIC:
    rows = grain.MapDataset.range(_ENDLESS).map(functools.partial(
        _synthetic_row, c=c, seed=dseed, heldout_split=False))
  elif c.source == "prompt_answer":
    rows = grain.MapDataset.source(_pair_rows(c, tok, train=True)).shuffle(
        seed=dseed % 2**32).pipe(_endless)
  else:
    docs = grain.MapDataset.source(_documents(c, train=True))
    token_docs = docs.shuffle(seed=dseed % 2**32).pipe(_endless).map(
        functools.partial(text.encode_document, tok))
    if not c.packing:
      rows = token_docs.map(functools.partial(packing.padded_row, seq_len=c.seq_len,
                                              pad_id=fill_id(tok)))
  if rows is not None:  # row streams: random access, batch, take this process's batches
    read = grain.ReadOptions(num_threads=c.num_threads, prefetch_buffer_size=c.prefetch)
    ds = rows.batch(local)[process_index::process_count].to_iter_dataset(read)
  else:  # packed text: this process's packing slots, zipped into batches
    ds = packing.packed_batches(
        token_docs, seq_len=c.seq_len, pad_id=fill_id(tok),
        document_attention=c.document_attention, global_batch_size=global_batch_size,
        first_row=process_index * local, num_rows=local)
    if c.prefetch > 0:
      ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=c.prefetch)
  return DataIterator(iter(ds), fingerprint=fingerprint)


def make_eval_batches(data_cfg, *, batch_size: int, num_batches: int, seed: int,
                      process_index: int = 0, process_count: int = 1) -> list[dict]:
  """`num_batches` held-out batches (this process's rows of each), disjoint from training.

  sudoku / arithmetic: examples 0.. of the held-out partition for `seed`. text: the held-out
  documents in corpus order; tfds: `eval_split` in order (`seed` unused for both).
  """
  spec = DataSpec.load(data_cfg)
  c = spec.section
  local = _local_rows(batch_size, process_index, process_count)
  need = batch_size * num_batches
  if c.source in _SYNTHETIC:
    dseed = _data_seed(c, seed)
    rows = [_synthetic_row(i, c=c, seed=dseed, heldout_split=True) for i in range(need)]
  elif c.source == "prepared":
    batch = prepared.eval_rows(c.path, spec.manifest, seq_len=c.seq_len, wrap=c.wrap, num_rows=need,
                               verify=c.verify_shards, stage_dir=c.stage_dir)
    lo = process_index * local
    return [{k: v[k0 + lo:k0 + lo + local] for k, v in batch.items()}
            for k0 in range(0, need, batch_size)]
  elif c.source == "prompt_answer":
    rows = _pair_rows(c, spec.tokenizer, train=False)[:need]
    if len(rows) < need:
      raise ValueError(f"{len(rows)} held-out prompt/answer pairs, but {num_batches} batches of "
                       f"{batch_size} need {need}: raise data.eval_examples or ask for fewer "
                       "evaluation batches")
  else:
    tok = spec.tokenizer
    docs = grain.MapDataset.source(_documents(c, train=False)).map(
        functools.partial(text.encode_document, tok))
    if c.packing:
      stream = iter(packing.packed_stream(docs, seq_len=c.seq_len, pad_id=fill_id(tok),
                                          document_attention=c.document_attention))
    else:
      stream = (packing.padded_row(d, seq_len=c.seq_len, pad_id=fill_id(tok))
                for d in docs)
    rows = list(itertools.islice(stream, need))
    if len(rows) < need:
      raise ValueError(
          f"the held-out {c.source} data gives only {len(rows)} rows of length "
          f"{c.seq_len}, but {num_batches} batches of {batch_size} need {need}; "
          + ("raise data.eval_examples or " if c.source == "text" else "")
          + "ask for fewer evaluation batches")
  lo = process_index * local
  return [slice_rows(stack_rows(rows[k * batch_size:(k + 1) * batch_size]), lo, lo + local)
          for k in range(num_batches)]
