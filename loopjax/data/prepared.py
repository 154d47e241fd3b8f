"""The `prepared` source: batches packed from the token shards `loopjax prepare` wrote.

Documents of the train split are read with grain from ArrayRecord, shuffled globally by
grain's index shuffle (a new permutation each epoch, nothing held in memory) and repeated.
Global batch row s is packing slot s: the stream of documents s, s+G, s+2G, ... (G = global
batch size), each followed by EOS, concatenated and cut into rows. A process runs only its
own slots, so it reads only its share of the documents, and the processes' batches
concatenated in process order are the one-process batch.

Wraps (`data.wrap`):
  mdlm      MDLM's wrap: each row is BOS + the next L-2 stream tokens + EOS; attention
            spans documents (segment_ids all 1).
  document  each row is the next L stream tokens; segment_ids number the documents inside
            the row from 1, so attention stays within a document.
No position is padding: every token is noised and scored.

The packing iterator's state is, per slot, the index of its current document and the
tokens of it already emitted. With `data.workers` > 0 the slots are divided between grain
worker processes (`mp_prefetch`), each making the rows of its slots; their partial batches
are merged back in slot order, so the batches do not depend on the worker count.
"""

from __future__ import annotations

import functools
import hashlib
import json

import grain
import numpy as np

from loopjax.data import shards
from loopjax.data.batch import BATCH_KEYS
from loopjax.data.tokenizers import Tokenizer

WRAPS = ("mdlm", "document")


def check_tokenizer(manifest: dict, tok: Tokenizer, path: str) -> None:
  """ValueError unless `tok` is the tokenizer the corpus was prepared with."""
  want = manifest["tokenizer"]
  have = shards.tokenizer_identity(tok.describe())
  if have["identity_sha256"] != want["identity_sha256"]:
    raise ValueError(
        f"data.tokenizer {have.get('spec', have['type'])!r} (vocab {have['vocab_size']}) is "
        f"not the tokenizer the corpus {path!r} was prepared with: "
        f"{want.get('spec', want['type'])!r} (vocab {want['vocab_size']}, identity sha256 "
        f"{want['identity_sha256'][:12]} vs {have['identity_sha256'][:12]}); set "
        f"--config.data.tokenizer to that tokenizer")
  dtype = shards.token_dtype(want["vocab_size"]).name
  if manifest["dtype"] != dtype:
    raise ValueError(f"the shards of {path!r} hold {manifest['dtype']} ids, but a vocabulary "
                     f"of {want['vocab_size']} is stored as {dtype}: the shards are of "
                     "another vocabulary; re-run prepare")


def open_manifest(path: str, tok: Tokenizer) -> dict:
  m = shards.load_manifest(path)
  check_tokenizer(m, tok, path)
  return m


def _decode(record: bytes, *, dtype: str) -> np.ndarray:
  return np.frombuffer(record, dtype)


def split_documents(path: str, manifest: dict, split: str, *,
                    verify: bool = False) -> grain.MapDataset:
  """The documents of `split` as a grain MapDataset of token-id arrays, in corpus order."""
  paths = shards.check_shards(path, manifest, split, full_hash=verify)
  if not paths:
    raise ValueError(f"the {split} split of the prepared corpus {path!r} is empty")
  src = grain.sources.ArrayRecordDataSource(paths)
  if len(src) != manifest["splits"][split]["docs"]:
    raise ValueError(f"the {split} shards of {path!r} hold {len(src)} documents, the manifest "
                     f"says {manifest['splits'][split]['docs']}")
  return grain.MapDataset.source(src).map(functools.partial(_decode, dtype=manifest["dtype"]))


def corpus_fingerprint(manifest: dict) -> str:
  digest = hashlib.sha256(json.dumps([manifest["tokenizer"]["identity_sha256"],
                                      manifest["splits"]], sort_keys=True).encode())
  return digest.hexdigest()[:16]


class PackedRows(grain.IterDataset):
  """Batches of the rows of packing slots `slots` (see the module docstring)."""

  def __init__(self, docs: grain.MapDataset, *, slots, stride: int, seq_len: int, wrap: str,
               bos_id: int | None, eos_id: int | None, vocab_size: int,
               limit: int | None = None):
    super().__init__([docs])
    if wrap not in WRAPS:
      raise ValueError(f"data.wrap must be one of {WRAPS}, got {wrap!r}")
    if wrap == "mdlm" and (seq_len < 3 or bos_id is None or eos_id is None):
      raise ValueError("the mdlm wrap needs data.seq_len >= 3 and a tokenizer with EOS")
    self.docs, self.slots, self.stride = docs, list(slots), stride
    self.seq_len, self.wrap, self.vocab_size = seq_len, wrap, vocab_size
    self.bos_id, self.eos_id, self.limit = bos_id, eos_id, limit  # limit: docs of a finite one

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """grain worker w of W makes the rows of slots[w::W]."""
    del sequential_slice
    self.slots = self.slots[sl]

  def __iter__(self):
    return _PackedRowsIterator(self)

  def __str__(self) -> str:
    return f"PackedRows(slots={len(self.slots)}, seq_len={self.seq_len}, wrap={self.wrap})"


class _PackedRowsIterator(grain.DatasetIterator):

  def __init__(self, ds: PackedRows):
    super().__init__()
    self._ds = ds
    self._doc = [0] * len(ds.slots)       # index of the current document in the slot stream
    self._off = [0] * len(ds.slots)       # its tokens (incl. EOS) already emitted
    self._cache: dict[int, np.ndarray] = {}
    self._eos = (np.zeros(0, np.int32) if ds.eos_id is None
                 else np.array([ds.eos_id], np.int32))

  def _document(self, i: int) -> np.ndarray:
    d = self._cache.get(i)
    if d is None or d[0] != self._doc[i]:
      ds = self._ds
      index = ds.slots[i] + ds.stride * self._doc[i]
      if ds.limit is not None and index >= ds.limit:
        raise IndexError(index)
      ids = ds.docs[index]
      d = (self._doc[i], np.concatenate([ids.astype(np.int32), self._eos]))
      self._cache[i] = d
    return d[1]

  def _fill(self, i: int, out: np.ndarray, seg: np.ndarray | None) -> None:
    pos, segment = 0, 1
    while pos < out.size:
      d = self._document(i)
      take = min(out.size - pos, d.size - self._off[i])
      out[pos:pos + take] = d[self._off[i]:self._off[i] + take]
      if seg is not None:
        seg[pos:pos + take] = segment
      pos += take
      self._off[i] += take
      if self._off[i] >= d.size:
        self._doc[i], self._off[i], segment = self._doc[i] + 1, 0, segment + 1

  def __next__(self) -> dict:
    ds, n = self._ds, len(self._ds.slots)
    tokens = np.empty((n, ds.seq_len), np.int32)
    seg = np.ones((n, ds.seq_len), np.int32)
    for i in range(n):
      if ds.wrap == "mdlm":
        tokens[i, 0], tokens[i, -1] = ds.bos_id, ds.eos_id
        self._fill(i, tokens[i, 1:-1], None)
      else:
        self._fill(i, tokens[i], seg[i])
    if tokens.size and tokens.max() >= ds.vocab_size:
      raise ValueError(f"token id {int(tokens.max())} in the prepared shards is >= the "
                       f"vocabulary size {ds.vocab_size}: the shards are of another "
                       "vocabulary than their manifest says; re-run prepare")
    return {"tokens": tokens, "fixed": np.zeros(tokens.shape, bool),
            "loss_mask": np.ones(tokens.shape, bool), "segment_ids": seg,
            "slots": np.asarray(ds.slots, np.int64)}

  def get_state(self) -> dict:
    return {"doc": list(self._doc), "offset": list(self._off)}

  def set_state(self, state: dict) -> None:
    if len(state["doc"]) != len(self._ds.slots):
      raise ValueError(f"packing state has {len(state['doc'])} slots, this iterator "
                       f"{len(self._ds.slots)}")
    self._doc, self._off = [int(x) for x in state["doc"]], [int(x) for x in state["offset"]]
    self._cache.clear()


def _merge(parts) -> dict:
  """Partial batches of the grain workers -> one batch in slot order."""
  slots = np.concatenate([p["slots"] for p in parts])
  order = np.argsort(slots, kind="stable")
  return {k: np.concatenate([p[k] for p in parts])[order] for k in BATCH_KEYS}


def _drop_slots(batch: dict) -> dict:
  return {k: batch[k] for k in BATCH_KEYS}


def train_batches(path: str, manifest: dict, *, seq_len: int, wrap: str, seed: int,
                  global_batch_size: int, first_row: int, num_rows: int, workers: int = 0,
                  verify: bool = False) -> grain.IterDataset:
  """This process's training batches: rows [first_row, first_row + num_rows) of each global
  batch, each made by its packing slot from the shuffled, repeated train documents."""
  docs = split_documents(path, manifest, "train", verify=verify).shuffle(
      seed=seed % 2**32).repeat()
  workers = min(workers, num_rows)
  rows = PackedRows(docs, slots=range(first_row, first_row + num_rows),
                    stride=global_batch_size, seq_len=seq_len, wrap=wrap,
                    bos_id=manifest["bos_id"], eos_id=manifest["eos_id"],
                    vocab_size=manifest["tokenizer"]["vocab_size"])
  if workers <= 0:
    return rows.map(_drop_slots)
  from absl import flags  # grain's worker processes read absl flags, which must be parsed
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return rows.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)).batch(
      workers, batch_fn=_merge)


def eval_rows(path: str, manifest: dict, *, seq_len: int, wrap: str, num_rows: int,
              verify: bool = False) -> dict:
  """The first `num_rows` packed rows of the held-out split, in corpus order (one slot)."""
  docs = split_documents(path, manifest, "heldout", verify=verify)
  rows = PackedRows(docs, slots=[0], stride=1, seq_len=seq_len, wrap=wrap,
                    bos_id=manifest["bos_id"], eos_id=manifest["eos_id"],
                    vocab_size=manifest["tokenizer"]["vocab_size"], limit=len(docs))
  it, out = iter(rows), []
  try:
    for _ in range(num_rows):
      out.append(next(it))
  except IndexError:
    raise ValueError(
        f"the held-out split of {path!r} ({manifest['splits']['heldout']['tokens']:,} tokens) "
        f"gives only {len(out)} rows of length {seq_len}, but {num_rows} are needed: ask for "
        "fewer evaluation batches or prepare with a larger --heldout") from None
  return {k: np.concatenate([r[k] for r in out]) for k in BATCH_KEYS}


def epochs(manifest: dict, *, rows: int, seq_len: int, wrap: str) -> float:
  """Passes over the train split that `rows` packed rows of `seq_len` make (each document
  carries one EOS; an mdlm row holds seq_len - 2 stream tokens)."""
  train = manifest["splits"]["train"]
  per_row = seq_len - 2 if wrap == "mdlm" else seq_len
  return rows * per_row / (train["tokens"] + (train["docs"] if manifest["eos_id"] is not None
                                              else 0))
