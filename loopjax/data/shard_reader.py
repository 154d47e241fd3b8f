"""Opens the token shards of one split lazily, one shard at a time, local or in a bucket.

A shard is opened the first time one of its records is read, and checked then against the
manifest (size and record count; sha256 with `verify`), so start-up opens nothing and a process
opens only the shards its rows read. ArrayRecord's reader opens local files only, so a shard of a
`gs://` corpus is first copied whole (one sequential object read, through the storage module's
fsspec client) into a staging folder on the host's disk and read there; at most `keep` staged
copies are kept, the least recently used removed first. `prefetch(k)` starts copying shard k on
a background thread, so that a reader moving on to it does not wait for the copy. Local corpora
are read in place.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import os
import shutil
import tempfile
import threading

from loopjax import storage
from loopjax.data import shards

# The reader reads each shard front to back in windows of records: the default readahead suits.
_READER_OPTIONS = ""


def open_shard(path: str):
  """An ArrayRecordReader of a local shard file (the one place shards are opened)."""
  from array_record.python.array_record_module import ArrayRecordReader
  return ArrayRecordReader(path, _READER_OPTIONS)


class ShardFiles:
  """The shards `entries` (manifest entries, in manifest order) of the corpus at `root`."""

  def __init__(self, root: str, entries, *, verify: bool = False, stage_dir: str = "",
               keep: int = 4):
    self.root, self.entries = root, list(entries)
    self.verify, self.stage_dir, self.keep = verify, stage_dir, max(1, keep)
    self.remote = storage.is_remote(root)
    self._fresh()

  def _fresh(self) -> None:
    self._open: collections.OrderedDict = collections.OrderedDict()  # shard -> (reader, local)
    self._pending: dict[int, concurrent.futures.Future] = {}  # shard -> its copy's local path
    self._pool, self._tmp, self._lock = None, None, threading.Lock()

  def __getstate__(self):  # grain worker processes open their own readers
    return {k: v for k, v in self.__dict__.items()
            if k not in ("_open", "_pending", "_pool", "_tmp", "_lock")}

  def __setstate__(self, state) -> None:
    self.__dict__.update(state)
    self._fresh()

  def __len__(self) -> int:
    return len(self.entries)

  def path(self, k: int) -> str:
    return storage.join(self.root, self.entries[k]["path"])

  def read(self, k: int, begin: int, end: int) -> list[bytes]:
    """Records [begin, end) of shard k."""
    reader = self._reader(k)
    return list(reader.read(begin, end)) if end > begin else []

  def prefetch(self, k: int) -> None:
    """Starts copying shard k from the bucket in the background (no-op if local or under way)."""
    if not self.remote or k in self._open or k in self._pending:
      return
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loopjax-stage")
    self._pending[k] = self._pool.submit(self._stage, k)

  def close(self) -> None:
    while self._open:
      self._evict()
    for future in self._pending.values():
      try:
        os.remove(future.result())
      except (OSError, ValueError):
        pass
    self._pending.clear()
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None

  def _reader(self, k: int):
    got = self._open.get(k)
    if got is not None:
      self._open.move_to_end(k)
      return got[0]
    pending = self._pending.pop(k, None)
    if pending is not None:
      local = pending.result()
    else:
      local = self._stage(k) if self.remote else self.path(k)
    shards.check_shard(self.path(k), local, self.entries[k], full_hash=self.verify)
    self._open[k] = (open_shard(local), local if self.remote else None)
    while len(self._open) > self.keep:
      self._evict()
    return self._open[k][0]

  def _evict(self) -> None:
    _, (reader, staged) = self._open.popitem(last=False)
    reader.close()
    if staged is not None and os.path.exists(staged):
      os.remove(staged)

  def _stage(self, k: int) -> str:
    """Copies shard k from the bucket to this process's staging folder; its local path."""
    with self._lock:  # the first copy may run on the prefetch thread
      if self._tmp is None:
        if self.stage_dir:
          os.makedirs(self.stage_dir, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix="loopjax-shards-", dir=self.stage_dir or None)
        atexit.register(shutil.rmtree, self._tmp, True)
    local = os.path.join(self._tmp, self.entries[k]["path"].replace("/", "_"))
    src = self.path(k)
    if not storage.exists(src):
      raise ValueError(f"token shard {src!r} listed in the manifest is missing")
    storage.download(src, local)
    return local
