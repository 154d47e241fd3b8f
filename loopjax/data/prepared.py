"""The `prepared` source: batches packed from the token shards `loopjax prepare` wrote.

Global batch row s is packing slot s (G slots = the global batch size). Each slot reads its own
contiguous range of the train documents, and a process reads only its rows' slots, so it opens
only the shards under its rows' ranges and reads each of them front to back:

  epoch order   for each epoch e (of a slot) the train shards are put in a random order (seeded
                by the data seed and e) and their documents concatenated: N documents;
  slot ranges   slot s owns positions [s*N//G, (s+1)*N//G) of the epoch order (one position when
                N < G): one G-th of the corpus, lying in one shard or a few adjacent ones;
  window        its range is read in windows of `data.shuffle_window` consecutive documents, each
                window in a random order (seeded by the data seed, e, s and the window);
  stream        slot s's stream is its range, epoch after epoch (a new shard order each epoch),
                every document followed by EOS, concatenated and cut into rows.

So rows [a, b) of every global batch, read by one process, cover the contiguous positions
[a*N//G, b*N//G) of each epoch order: about 1/P of the shards for P processes, each read
sequentially. A `gs://` corpus is read the same way, each shard copied whole to the host's disk
when first needed (shard_reader.py). Versus a global shuffle (every document placed at random),
documents that are near each other in an input file stay near each other within a slot (a
window apart at most), and a batch mixes G slots, i.e. G distant regions of the corpus; each
document is still read once per epoch of its slot. Slots run through their ranges at their own
pace (documents differ in length), so epochs are per slot.

Wraps (`data.wrap`): the `mdlm` and `document` layouts of packing.py, made by its `fill_row`.
Slot streams never end, so no position is padding: every token is noised and scored.

The packing iterator's state is, per slot, the index of its current document in the slot's
stream and the tokens of it already emitted, whatever process or worker runs the slot. With
`data.workers` > 0 the slots are divided between grain worker processes (`mp_prefetch`), each
making the rows of its slots; their partial batches are merged back in slot order, and the saved
state is converted to the same per-slot form, so neither the batches nor the state depend on the
worker count (a run may resume with other `data.workers` or processes).
"""

from __future__ import annotations

import functools
import hashlib
import json

import grain
import numpy as np

from loopjax.data import packing, shard_reader, shards
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
  """The documents of a local corpus's `split` as a grain MapDataset of token-id arrays, in
  corpus order (random access; for tests and tools, not the training stream)."""
  paths = shards.check_shards(path, manifest, split, full_hash=verify)
  if not paths:
    raise ValueError(f"the {split} split of the prepared corpus {path!r} is empty")
  src = grain.sources.ArrayRecordDataSource(paths)
  return grain.MapDataset.source(src).map(functools.partial(_decode, dtype=manifest["dtype"]))


def corpus_fingerprint(manifest: dict) -> str:
  digest = hashlib.sha256(json.dumps([manifest["tokenizer"]["identity_sha256"],
                                      manifest["splits"]], sort_keys=True).encode())
  return digest.hexdigest()[:16]


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng([seed % 2**32, *key])


class Strided:
  """Slot s's j-th document is docs[s + stride * j] (IndexError at or past `limit`)."""

  def __init__(self, docs, stride: int, limit: int | None = None):
    self.docs, self.stride, self.limit = docs, stride, limit

  def window(self, slot: int, j: int):
    index = slot + self.stride * j
    if self.limit is not None and index >= self.limit:
      raise IndexError(index)
    return j, [np.asarray(self.docs[index])]


class _ShardWindows:
  """Reads runs of consecutive documents of an order of shards through a ShardFiles."""

  def __init__(self, files: shard_reader.ShardFiles, dtype: str):
    self.files, self.dtype = files, dtype
    self.docs = np.array([e["docs"] for e in files.entries], np.int64)

  def close(self) -> None:
    self.files.close()

  def read(self, order: np.ndarray, ends: np.ndarray, begin: int, end: int,
           reader_end: int) -> list[np.ndarray]:
    """Documents [begin, end) of the concatenation of shards `order` (`ends`: its cumulative
    document counts), by a reader whose documents go on to `reader_end`: the next shard it will
    need is copied ahead (from a bucket)."""
    out, pos, t = [], begin, 0
    while pos < end:
      t = int(np.searchsorted(ends, pos, side="right"))
      first = int(ends[t] - self.docs[order[t]])
      stop = min(end, int(ends[t]))
      out += [np.frombuffer(r, self.dtype)
              for r in self.files.read(int(order[t]), pos - first, stop - first)]
      pos = stop
    if t + 1 < len(order) and ends[t] < reader_end:
      self.files.prefetch(int(order[t + 1]))
    return out


class Sequential(_ShardWindows):
  """One slot: the documents of the shards in manifest order, read `window` at a time."""

  def __init__(self, files: shard_reader.ShardFiles, dtype: str, window: int):
    super().__init__(files, dtype)
    self.window_size, self.order = window, np.arange(len(self.docs))
    self.ends, self.limit = np.cumsum(self.docs), int(self.docs.sum())

  def window(self, slot: int, j: int):
    del slot
    if j >= self.limit:
      raise IndexError(j)
    begin = j - j % self.window_size
    return begin, self.read(self.order, self.ends, begin,
                            min(self.limit, begin + self.window_size), self.limit)


class ShardRanges(_ShardWindows):
  """The training order of the module docstring: slot ranges of per-epoch shard orders, read in
  shuffled windows."""

  def __init__(self, files: shard_reader.ShardFiles, dtype: str, *, num_slots: int, seed: int,
               window: int):
    super().__init__(files, dtype)
    self.num_slots, self.seed, self.window_size = num_slots, seed, window
    self.total = int(self.docs.sum())
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def slot_range(self, slot: int) -> tuple[int, int]:
    """(first position, number of positions) of `slot` in every epoch order."""
    lo = slot * self.total // self.num_slots
    return lo, max(1, (slot + 1) * self.total // self.num_slots - lo)

  def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(shards in epoch order, their cumulative document counts)."""
    got = self._epochs.get(epoch)
    if got is None:
      order = _rng(self.seed, 0, epoch).permutation(len(self.docs))
      got = (order, np.cumsum(self.docs[order]))
      if len(self._epochs) >= 4:  # slots differ by an epoch at most, in practice
        self._epochs.pop(min(self._epochs))
      self._epochs[epoch] = got
    return got

  def window(self, slot: int, j: int):
    lo, n = self.slot_range(slot)
    epoch, i = divmod(j, n)
    begin = i - i % self.window_size
    size = min(self.window_size, n - begin)
    docs = self.read(*self.epoch_order(epoch), lo + begin, lo + begin + size, lo + n)
    perm = _rng(self.seed, 1, epoch, slot, begin).permutation(size)
    return epoch * n + begin, [docs[p] for p in perm]


class PackedRows(grain.IterDataset):
  """Batches of the rows of packing slots `slots` (see the module docstring). `stream` gives a
  slot's documents by windows (ShardRanges, Sequential); or `docs` with `stride` (and `limit`)
  make slot s read docs[s], docs[s + stride], ..."""

  def __init__(self, docs=None, *, slots, seq_len: int, wrap: str, bos_id: int | None,
               eos_id: int | None, vocab_size: int, stride: int | None = None,
               limit: int | None = None, stream=None):
    super().__init__([docs] if isinstance(docs, grain.MapDataset) else [])
    if wrap not in WRAPS:
      raise ValueError(f"data.wrap must be one of {WRAPS}, got {wrap!r}")
    packing.check_layout(wrap, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id, key="data.wrap")
    self.stream = stream if stream is not None else Strided(docs, stride, limit)
    self.slots, self.seq_len, self.wrap = list(slots), seq_len, wrap
    self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

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
    self._cursors = [packing.Cursor() for _ in ds.slots]
    self._windows: dict[int, tuple[int, list]] = {}  # slot i -> (first index, documents)
    self._cache: dict[int, tuple[int, np.ndarray]] = {}
    self._eos = (np.zeros(0, np.int32) if ds.eos_id is None
                 else np.array([ds.eos_id], np.int32))

  def _document(self, i: int, j: int) -> np.ndarray:
    """Document j of slot i's stream, EOS appended (IndexError past the stream's end)."""
    d = self._cache.get(i)
    if d is None or d[0] != j:
      w = self._windows.get(i)
      if w is None or not w[0] <= j < w[0] + len(w[1]):
        w = self._windows[i] = self._ds.stream.window(self._ds.slots[i], j)
      d = (j, np.concatenate([w[1][j - w[0]].astype(np.int32), self._eos]))
      self._cache[i] = d
    return d[1]

  def close(self) -> None:
    """Closes the shards the stream opened (and removes their copies)."""
    if not self._closed:
      getattr(self._ds.stream, "close", lambda: None)()
    super().close()

  def __next__(self) -> dict:
    ds, n = self._ds, len(self._ds.slots)
    tokens = np.empty((n, ds.seq_len), np.int32)
    seg = np.empty((n, ds.seq_len), np.int32)
    for i in range(n):
      real = packing.fill_row(self._cursors[i], functools.partial(self._document, i),
                              tokens[i], seg[i], layout=ds.wrap, bos_id=ds.bos_id,
                              eos_id=ds.eos_id, pad_id=0)
      if real < ds.seq_len:  # a finite stream (`limit`, a held-out split) ran out
        raise IndexError(f"packing slot {ds.slots[i]} ran out of documents")
    if tokens.size and tokens.max() >= ds.vocab_size:
      raise ValueError(f"token id {int(tokens.max())} in the prepared shards is >= the "
                       f"vocabulary size {ds.vocab_size}: the shards are of another "
                       "vocabulary than their manifest says; re-run prepare")
    return {"tokens": tokens, "fixed": np.zeros(tokens.shape, bool),
            "loss_mask": np.ones(tokens.shape, bool), "segment_ids": seg,
            "slots": np.asarray(ds.slots, np.int64)}

  def get_state(self) -> dict:
    return {"doc": [c.doc for c in self._cursors], "offset": [c.offset for c in self._cursors]}

  def set_state(self, state: dict) -> None:
    if len(state["doc"]) != len(self._ds.slots):
      raise ValueError(f"packing state has {len(state['doc'])} slots, this iterator "
                       f"{len(self._ds.slots)}")
    self._cursors = [packing.Cursor(d, o) for d, o in zip(state["doc"], state["offset"])]
    self._cache.clear()
    self._windows.clear()


def _merge(parts) -> dict:
  """Partial batches of the grain workers -> one batch in slot order."""
  slots = np.concatenate([p["slots"] for p in parts])
  order = np.argsort(slots, kind="stable")
  return {k: np.concatenate([p[k] for p in parts])[order] for k in BATCH_KEYS}


def _drop_slots(batch: dict) -> dict:
  return {k: batch[k] for k in BATCH_KEYS}


class _PerSlotStates(grain.IterDataset):
  """The merged batches of grain worker processes, with their state in the per-slot form of a
  PackedRows iterator (`{"doc": [...], "offset": [...]}` in slot order) whatever the worker
  count: worker w of W runs slots[w::W], and every merged batch takes one partial batch of each
  worker, so after every batch the workers' states are those of their slots."""

  def __init__(self, parent: grain.IterDataset, *, num_slots: int, workers: int):
    super().__init__([parent])
    self.num_slots, self.workers = num_slots, workers

  def __iter__(self):
    return _PerSlotStatesIterator(self)


class _PerSlotStatesIterator(grain.DatasetIterator):

  def __init__(self, ds: _PerSlotStates):
    super().__init__(ds._parent.__iter__())  # noqa: SLF001
    self._n, self._w = ds.num_slots, ds.workers

  def __next__(self) -> dict:
    return next(self._parent)

  def get_state(self) -> dict:
    g = self._parent.get_state()
    workers = g.get("iterators_in_use_states")
    if g.get("next_index_in_cycle") != 0 or g.get("future_states") or \
        not isinstance(workers, list) or len(workers) != self._w:
      raise ValueError(f"unexpected state of grain's worker processes: {str(g)[:300]}")
    doc, off = [0] * self._n, [0] * self._n
    for w, st in enumerate(workers):
      d, o = st["doc"], st["offset"]
      if len(d) == self._n and self._w > 1:  # before the first batch: the unsliced iterators'
        d, o = d[w::self._w], o[w::self._w]
      doc[w::self._w], off[w::self._w] = d, o
    return {"doc": doc, "offset": off}

  def set_state(self, state: dict) -> None:
    if len(state["doc"]) != self._n:
      raise ValueError(f"packing state has {len(state['doc'])} slots, this iterator {self._n}")
    g = dict(self._parent.get_state())
    g["iterators_in_use_states"] = [
        {"doc": list(state["doc"][w::self._w]), "offset": list(state["offset"][w::self._w])}
        for w in range(self._w)]
    self._parent.set_state(g)


def train_batches(path: str, manifest: dict, *, seq_len: int, wrap: str, seed: int,
                  global_batch_size: int, first_row: int, num_rows: int, workers: int = 0,
                  window: int = 256, verify: bool = False,
                  stage_dir: str = "") -> grain.IterDataset:
  """This process's training batches: rows [first_row, first_row + num_rows) of each global
  batch, each made by its packing slot from its range of the train documents."""
  entries = shards.split_entries(path, manifest, "train")
  if not manifest["splits"]["train"]["docs"]:
    raise ValueError(f"the train split of the prepared corpus {path!r} is empty")
  if window < 1:
    raise ValueError(f"data.shuffle_window must be >= 1 documents, got {window}")
  workers = min(workers, num_rows)
  # A slot is in one shard at a time, two while its window straddles a shard boundary.
  per_reader = -(-num_rows // max(workers, 1)) + 2
  files = shard_reader.ShardFiles(path, entries, verify=verify, stage_dir=stage_dir,
                                  keep=per_reader)
  stream = ShardRanges(files, manifest["dtype"], num_slots=global_batch_size, seed=seed,
                       window=window)
  rows = PackedRows(slots=range(first_row, first_row + num_rows), seq_len=seq_len, wrap=wrap,
                    bos_id=manifest["bos_id"], eos_id=manifest["eos_id"],
                    vocab_size=manifest["tokenizer"]["vocab_size"], stream=stream)
  if workers <= 0:
    return rows.map(_drop_slots)
  from absl import flags  # grain's worker processes read absl flags, which must be parsed
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  merged = rows.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)).batch(
      workers, batch_fn=_merge)
  return _PerSlotStates(merged, num_slots=num_rows, workers=workers)


def eval_rows(path: str, manifest: dict, *, seq_len: int, wrap: str, num_rows: int,
              verify: bool = False, stage_dir: str = "") -> dict:
  """The first `num_rows` packed rows of the held-out split, in corpus order (one slot)."""
  entries = shards.split_entries(path, manifest, "heldout")
  files = shard_reader.ShardFiles(path, entries, verify=verify, stage_dir=stage_dir, keep=2)
  rows = PackedRows(slots=[0], seq_len=seq_len, wrap=wrap, bos_id=manifest["bos_id"],
                    eos_id=manifest["eos_id"], vocab_size=manifest["tokenizer"]["vocab_size"],
                    stream=Sequential(files, manifest["dtype"], window=256))
  it, out = iter(rows), []
  try:
    for _ in range(num_rows):
      out.append(next(it))
  except IndexError:
    raise ValueError(
        f"the held-out split of {path!r} ({manifest['splits']['heldout']['tokens']:,} tokens) "
        f"gives only {len(out)} rows of length {seq_len}, but {num_rows} are needed: ask for "
        "fewer evaluation batches or prepare with a larger --heldout") from None
  finally:
    files.close()
  return {k: np.concatenate([r[k] for r in out]) for k in BATCH_KEYS}


def epochs(manifest: dict, *, rows: int, seq_len: int, wrap: str) -> float:
  """Passes over the train split that `rows` packed rows of `seq_len` make (each document
  carries one EOS; an mdlm row holds seq_len - 2 stream tokens)."""
  train = manifest["splits"]["train"]
  per_row = seq_len - 2 if wrap == "mdlm" else seq_len
  return rows * per_row / (train["tokens"] + (train["docs"] if manifest["eos_id"] is not None
                                              else 0))
