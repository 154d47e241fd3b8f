"""Tokenize a corpus once (`loopjax prepare`) into ArrayRecord token shards (see shards.py).

Work is split by input file: input file F (in `corpus.list_inputs` order) is tokenized in
order and cut into parts of about `shard_tokens` tokens, each part written as one train and
one held-out shard. A worker pool processes files in parallel; since a file's parts depend
only on the file, the shards are the same for any worker count. A part is written under a
temporary name and renamed when complete, then its completion record is written, so a
killed run resumes from the completed parts (verified by sha256) of each file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import queue as queue_lib
import shutil
import sys
import time

import numpy as np

from loopjax import storage
from loopjax.data import corpus, shards
from loopjax.data.tokenizers import bos_id, make_tokenizer
from loopjax.errors import UserError

DEFAULT_SHARD_TOKENS = 50_000_000
DEFAULT_HELDOUT = 0.005
_REPORT_S = 0.5

_WORKER: dict = {}


def _part_name(file_idx: int, part: int) -> str:
  return f"{file_idx:05d}-{part:05d}"


def _completed_parts(out_dir: str, file_idx: int) -> list[dict]:
  """This file's completion records whose shards still match; later parts are discarded."""
  kept = []
  for path in sorted(glob.glob(os.path.join(out_dir, "parts", f"{file_idx:05d}-*.json"))):
    with open(path) as f:
      rec = json.load(f)
    ok = rec["part"] == len(kept) and all(
        os.path.isfile(os.path.join(out_dir, s["path"]))
        and shards.file_sha256(os.path.join(out_dir, s["path"])) == s["sha256"]
        for s in rec["shards"].values() if s["docs"])
    if not ok:
      break
    kept.append(rec)
  for path in sorted(glob.glob(os.path.join(out_dir, "parts", f"{file_idx:05d}-*.json"))):
    if int(os.path.basename(path)[6:11]) >= len(kept):
      os.remove(path)
  return kept


class _PartWriter:
  """The train and held-out shards of one part, written to temporary names."""

  def __init__(self, out_dir: str, file_idx: int, part: int, doc_start: int):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.out_dir, self.file_idx, self.part = out_dir, file_idx, part
    self.doc_start, self.docs = doc_start, 0
    self.rel = {s: os.path.join(s, _part_name(file_idx, part) + ".arrayrecord")
                for s in shards.SPLITS}
    self.counts = {s: [0, 0] for s in shards.SPLITS}  # docs, tokens
    self.writers = {s: ArrayRecordWriter(self._tmp(s), shards.WRITER_OPTIONS)
                    for s in shards.SPLITS}

  def _tmp(self, split: str) -> str:
    return os.path.join(self.out_dir, self.rel[split] + ".tmp")

  def add(self, split: str, ids: np.ndarray) -> None:
    self.writers[split].write(ids.tobytes())
    self.counts[split][0] += 1
    self.counts[split][1] += int(ids.size)
    self.docs += 1

  @property
  def tokens(self) -> int:
    return sum(c[1] for c in self.counts.values())

  def abort(self) -> None:
    """Closes and removes the temporary files (the part is redone on resume)."""
    for s, w in self.writers.items():
      w.close()
      if os.path.exists(self._tmp(s)):
        os.remove(self._tmp(s))

  def finish(self, last: bool) -> dict:
    rec = {"file": self.file_idx, "part": self.part, "doc_start": self.doc_start,
           "doc_end": self.doc_start + self.docs, "last": last, "shards": {}}
    for s, w in self.writers.items():
      w.close()
      if not self.counts[s][0]:  # a split with no document here gets no shard file
        os.remove(self._tmp(s))
        rec["shards"][s] = {"path": None, "docs": 0, "tokens": 0}
        continue
      final = os.path.join(self.out_dir, self.rel[s])
      os.replace(self._tmp(s), final)
      rec["shards"][s] = {"path": self.rel[s], "docs": self.counts[s][0],
                          "tokens": self.counts[s][1], "bytes": os.path.getsize(final),
                          "sha256": shards.file_sha256(final)}
    done = os.path.join(self.out_dir, "parts", _part_name(self.file_idx, self.part) + ".json")
    with open(done + ".tmp", "w") as f:
      json.dump(rec, f, indent=1, sort_keys=True)
    os.replace(done + ".tmp", done)
    return rec


def _init_worker(tokenizer_spec: str, progress_queue) -> None:
  _WORKER["tok"] = make_tokenizer(tokenizer_spec)
  _WORKER["queue"] = progress_queue
  _WORKER["parent"] = os.getppid()


def _report(msg) -> None:
  q = _WORKER.get("queue")
  if q is not None:
    q.put(msg)


def _prepare_file(task: dict) -> list[dict]:
  """Tokenizes one input file into its parts, continuing after its completed parts."""
  out_dir, idx, path = task["out_dir"], task["file_idx"], task["path"]
  tok = _WORKER["tok"]
  dtype = shards.token_dtype(tok.vocab_size)
  parts = _completed_parts(out_dir, idx)
  if parts and parts[-1]["last"]:
    _report(("file", idx, task["bytes"], None))
    return parts
  skip = parts[-1]["doc_end"] if parts else 0
  writer = _PartWriter(out_dir, idx, len(parts), skip)
  text_bytes, docs, tokens, t_last = 0, 0, 0, time.monotonic()
  try:
    docs_in = corpus.iter_documents(path, text_field=task["text_field"],
                                    txt_split=task["txt_split"], input_format=task["format"])
    for n, doc in enumerate(docs_in):
      if n < skip:
        continue
      if writer.tokens >= task["shard_tokens"]:
        parts.append(writer.finish(last=False))
        writer = _PartWriter(out_dir, idx, len(parts), n)
        if task.get("_stop_after_parts") is not None and \
            len(parts) >= task["_stop_after_parts"]:
          raise KeyboardInterrupt("stopped after a part (test hook)")
      ids = np.asarray(tok.encode(doc), dtype)
      held = task["all_heldout"] or shards.is_heldout(doc, task["heldout"])
      writer.add("heldout" if held else "train", ids)
      text_bytes, docs, tokens = text_bytes + len(doc), docs + 1, tokens + int(ids.size)
      if time.monotonic() - t_last > _REPORT_S:
        if _WORKER.get("parent") not in (None, os.getppid()):
          os._exit(1)  # the parent was killed: stop before a resumed run redoes this file
        _report(("progress", idx, text_bytes, docs, tokens))
        text_bytes, docs, tokens, t_last = 0, 0, 0, time.monotonic()
  except BaseException:
    writer.abort()
    raise
  parts.append(writer.finish(last=True))
  _report(("progress", idx, text_bytes, docs, tokens))
  _report(("file", idx, task["bytes"], None))
  return parts


class _Progress:
  """Input bytes, documents and tokens done, with rate and ETA, on one stderr line."""

  def __init__(self, total_bytes: int, enabled: bool):
    self.total, self.enabled, self.t0 = max(total_bytes, 1), enabled, time.monotonic()
    self.done_bytes, self.partial, self.docs, self.tokens = 0, {}, 0, 0
    self.ratio, self._file_text, self._last = 1.0, {}, 0.0

  def update(self, msg) -> None:
    kind, idx = msg[0], msg[1]
    if kind == "progress":
      self._file_text[idx] = self._file_text.get(idx, 0) + msg[2]
      self.docs, self.tokens = self.docs + msg[3], self.tokens + msg[4]
    else:
      self.done_bytes += msg[2]
      if self._file_text.get(idx):
        self.ratio = msg[2] / self._file_text[idx]
      self._file_text.pop(idx, None)

  def show(self, force: bool = False) -> None:
    now = time.monotonic()
    if not self.enabled or (not force and now - self._last < 1.0):
      return
    self._last = now
    frac = min(1.0, (self.done_bytes + self.ratio * sum(self._file_text.values())) / self.total)
    dt = now - self.t0
    eta = dt * (1 - frac) / frac if frac > 0 else float("inf")
    eta_s = "?" if eta == float("inf") else time.strftime("%H:%M:%S", time.gmtime(eta))
    print(f"\rprepare: {100 * frac:5.1f}% of {self.total / 1e6:.1f} MB input, "
          f"{self.docs:,} docs, {self.tokens:,} tokens, {self.tokens / max(dt, 1e-9) / 1e6:.2f}M "
          f"tokens/s, ETA {eta_s}   ", end="", file=sys.stderr, flush=True)


def _check_arguments(out_dir: str, record: dict) -> None:
  path = os.path.join(out_dir, "prepare.json")
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old != record:
      diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
      raise ValueError(f"{out_dir!r} holds a prepare run with different {diff}; use a new "
                       "--out directory or delete it")
    return
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def _manifest(record: dict, parts: list[dict], tok, command: str | None) -> dict:
  splits = {}
  for s in shards.SPLITS:
    entries = [p["shards"][s] for p in parts if p["shards"][s]["docs"]]
    splits[s] = {"docs": sum(e["docs"] for e in entries),
                 "tokens": sum(e["tokens"] for e in entries), "shards": entries}
  return {
      "format": shards.FORMAT, "format_version": shards.FORMAT_VERSION,
      "tokenizer": record["tokenizer"], "dtype": shards.token_dtype(tok.vocab_size).name,
      "eos_id": tok.eos_id, "bos_id": bos_id(tok), "pad_id": tok.pad_id,
      "heldout_rule": (f"every document of heldout_inputs; others iff blake2b-64(utf-8 text) "
                       f"< {record['heldout']} * 2**64 (little-endian digest)"),
      "splits": splits,
      "inputs": record["inputs"], "heldout_inputs": record.get("heldout_inputs", []),
      "arguments": {k: record.get(k) for k in ("text_field", "txt_split", "format",
                                               "shard_tokens", "heldout")},
      "command": command,
  }


def _plan(inputs, tokenizer_spec: str, *, text_field: str, txt_split: str,
          input_format: str | None, heldout_inputs, num_workers: int, shard_tokens: int,
          heldout: float):
  """(input files, held-out input files, tokenizer, the run's record) after checking every
  argument and input, before any work."""
  if num_workers < 1:
    raise ValueError(f"--workers must be >= 1, got {num_workers}")
  if shard_tokens < 1:
    raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
  if not 0 <= heldout < 1:
    raise ValueError(f"heldout must be a fraction in [0, 1), got {heldout}")
  files = corpus.list_inputs(inputs, input_format)
  held_files = corpus.list_inputs(heldout_inputs, input_format) if heldout_inputs else []
  tok = make_tokenizer(tokenizer_spec)
  for f in files + held_files:
    corpus.check_input(f, text_field=text_field, txt_split=txt_split,
                       input_format=input_format)
  record = {"tokenizer": shards.tokenizer_identity(tok.describe()),
            "inputs": [{"path": corpus.input_name(f), "bytes": corpus.input_bytes(f)}
                       for f in files],
            "heldout_inputs": [{"path": corpus.input_name(f), "bytes": corpus.input_bytes(f)}
                               for f in held_files],
            "text_field": text_field, "txt_split": txt_split, "format": input_format,
            "shard_tokens": shard_tokens, "heldout": heldout}
  return files, held_files, tok, record


def default_stage_dir(url: str) -> str:
  """Where `prepare --out gs://...` writes the shards before uploading them (so a killed run
  resumes from its completed parts): a folder of the user's cache named by the URL."""
  digest = hashlib.sha256(url.encode()).hexdigest()[:16]
  return os.path.join(os.path.expanduser("~"), ".cache", "loopjax", "prepare", digest)


def _check_remote(url: str, record: dict) -> dict | None:
  """The manifest already at `url` if it is this same prepare run's, None if there is none;
  ValueError if another corpus is there (nothing is overwritten)."""
  if not storage.exists(shards.manifest_path(url)):
    return None
  old = shards.load_manifest(url)
  mine = {"tokenizer": record["tokenizer"], "inputs": record["inputs"],
          "heldout_inputs": record["heldout_inputs"],
          "arguments": {k: record[k] for k in ("text_field", "txt_split", "format",
                                               "shard_tokens", "heldout")}}
  diff = sorted(k for k in mine if old.get(k) != mine[k])
  if diff:
    raise ValueError(f"{url} already holds a prepared corpus made with different {diff}; use "
                     "a new --out or delete it")
  return old


def _upload(stage: str, url: str, manifest: dict) -> None:
  """The shards (those not yet there whole), then the manifest, which readers look for first."""
  for split in manifest["splits"].values():
    for s in split["shards"]:
      dst = storage.join(url, s["path"])
      if storage.isfile(dst) and storage.Path(dst).stat().length == s["bytes"]:
        continue
      storage.upload(os.path.join(stage, s["path"]), dst)
  storage.upload(shards.manifest_path(stage), shards.manifest_path(url))


def prepare(inputs, tokenizer_spec: str, out_dir: str, *, text_field: str = "text",
            txt_split: str = "paragraph", input_format: str | None = None,
            heldout_inputs=(), num_workers: int = 1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, heldout: float = DEFAULT_HELDOUT,
            command: str | None = None, progress: bool = True, stage_dir: str = "",
            _stop_after_parts: int | None = None) -> dict:
  """Tokenizes `inputs` into token shards under `out_dir`; returns the manifest.

  Documents of `heldout_inputs` (e.g. a corpus's official test files) are all held out; the
  others by the hash rule with fraction `heldout`. Re-running with the same arguments resumes
  an interrupted run (or returns the finished manifest). `num_workers` processes tokenize files
  in parallel (1: in this process). A `gs://` out_dir is written in `stage_dir` (default:
  default_stage_dir, removed after the upload) and uploaded when complete, the manifest last.
  """
  storage.check_client(out_dir)
  files, held_files, tok, record = _plan(
      inputs, tokenizer_spec, text_field=text_field, txt_split=txt_split,
      input_format=input_format, heldout_inputs=heldout_inputs, num_workers=num_workers,
      shard_tokens=shard_tokens, heldout=heldout)
  if storage.is_remote(out_dir):
    url = storage.resolve(out_dir)
    done = _check_remote(url, record)
    if done is not None:
      return done
    stage = stage_dir or default_stage_dir(url)
    manifest = prepare(inputs, tokenizer_spec, stage, text_field=text_field,
                       txt_split=txt_split, input_format=input_format,
                       heldout_inputs=heldout_inputs, num_workers=num_workers,
                       shard_tokens=shard_tokens, heldout=heldout, command=command,
                       progress=progress, _stop_after_parts=_stop_after_parts)
    _upload(stage, url, manifest)
    if not stage_dir:  # the default stage was only a step towards the bucket
      shutil.rmtree(stage, ignore_errors=True)
    return manifest
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  for d in (out_dir, *(os.path.join(out_dir, s) for s in (*shards.SPLITS, "parts"))):
    os.makedirs(d, exist_ok=True)
  record = {"out_dir": out_dir, **record}
  _check_arguments(out_dir, record)
  tasks = [dict(out_dir=out_dir, file_idx=i, path=f, bytes=corpus.input_bytes(f),
                text_field=text_field, txt_split=txt_split, format=input_format,
                shard_tokens=shard_tokens, heldout=heldout, all_heldout=i >= len(files),
                _stop_after_parts=_stop_after_parts)
           for i, f in enumerate(files + held_files)]
  bar = _Progress(sum(t["bytes"] for t in tasks), progress)
  workers = min(num_workers, len(tasks))
  if workers == 1:
    _WORKER.clear()
    _WORKER["tok"], q = tok, queue_lib.SimpleQueue()
    _WORKER["queue"] = q
    results = []
    for t in tasks:
      results.append(_prepare_file(t))
      while not q.empty():
        bar.update(q.get())
      bar.show()
    _WORKER.clear()
  else:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec, q)) as pool:
      pending = [pool.apply_async(_prepare_file, (t,)) for t in tasks]
      while not all(p.ready() for p in pending):
        if any(p.ready() and not p.successful() for p in pending):
          break  # the first error is raised below, without waiting for the other files
        try:
          bar.update(q.get(timeout=_REPORT_S))
        except queue_lib.Empty:
          pass
        bar.show()
      results = [p.get() for p in pending]
      while True:
        try:
          bar.update(q.get_nowait())
        except queue_lib.Empty:
          break
  bar.show(force=True)
  if progress:
    print(file=sys.stderr)
  parts = [p for r in results for p in r]
  manifest = _manifest(record, parts, tok, command)
  if not any(manifest["splits"][s]["docs"] for s in shards.SPLITS):
    raise ValueError(f"the corpus {list(inputs)} has no non-empty documents "
                     f"(text field {text_field!r})")
  path = shards.manifest_path(out_dir)
  with open(path + ".tmp", "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  return manifest


def write_tokenized(out_dir: str, documents, tokenizer_spec: str, *, heldout_every: int = 0,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
  """Writes already tokenized documents (int arrays, no EOS) as a prepared corpus; document
  i is held out iff `heldout_every` and i % heldout_every == 0. Returns the manifest."""
  tok = make_tokenizer(tokenizer_spec)
  dtype = shards.token_dtype(tok.vocab_size)
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  for d in (out_dir, *(os.path.join(out_dir, s) for s in (*shards.SPLITS, "parts"))):
    os.makedirs(d, exist_ok=True)
  parts, writer = [], _PartWriter(out_dir, 0, 0, 0)
  for i, ids in enumerate(documents):
    if writer.tokens >= shard_tokens:
      parts.append(writer.finish(last=False))
      writer = _PartWriter(out_dir, 0, len(parts), i)
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
      raise ValueError(f"document {i}: ids outside [0, {tok.vocab_size})")
    writer.add("heldout" if heldout_every and i % heldout_every == 0 else "train",
               ids.astype(dtype))
  parts.append(writer.finish(last=True))
  record = {"tokenizer": shards.tokenizer_identity(tok.describe()), "inputs": [],
            "text_field": None, "txt_split": None, "shard_tokens": shard_tokens,
            "heldout": None}
  manifest = _manifest(record, parts, tok, None)
  manifest["heldout_rule"] = f"document index % {heldout_every} == 0" if heldout_every else None
  with open(shards.manifest_path(out_dir), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return manifest


if __name__ == "__main__":  # the command moved to loopjax/cli/: one line naming it, exit 2
  print(f"{__spec__.name if __spec__ else __file__} is a library module now: run loopjax prepare ... (or python -m loopjax.cli.prepare ...)",
        file=sys.stderr)
  sys.exit(2)
