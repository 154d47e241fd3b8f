"""The on-disk format of a prepared corpus: ArrayRecord token shards plus `manifest.json`.

  DIR/manifest.json                  what made the corpus and what it holds (see `prepare`)
  DIR/<split>/FFFFF-PPPPP.arrayrecord  split "train" or "heldout"; part PPPPP of input file
                                     FFFFF. One record per document: its token ids (no EOS),
                                     little-endian uint16 if the vocabulary has <= 65536 ids,
                                     else uint32. Written with group_size:1 (random access).
  DIR/parts/FFFFF-PPPPP.json         completion record of a part (resume bookkeeping)

A document is held out iff the first 8 bytes of blake2b(its UTF-8 text), read as a
little-endian integer, are < heldout * 2**64: a rule of the text alone, so it does not depend
on file layout, worker count or order. Documents of inputs given as held-out inputs (a
corpus's official test files) are all held out.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from loopjax import storage

FORMAT = "loopjax-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
WRITER_OPTIONS = "group_size:1,uncompressed"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def tokenizer_identity(describe: dict) -> dict:
  """The tokenizer's description without where its file lives, plus a sha256 of that."""
  ident = {k: v for k, v in describe.items() if k not in ("spec", "file")}
  digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
  return {**describe, "identity_sha256": digest}


def is_heldout(text: str, fraction: float) -> bool:
  h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(h, "little") < fraction * 2.0**64


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def write_records(path: str, records) -> None:
  """Writes byte strings to an ArrayRecord file at `path` (overwriting it)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(path, WRITER_OPTIONS)
  try:
    for r in records:
      w.write(r)
  finally:
    w.close()


def num_records(path: str) -> int:
  """Records in an ArrayRecord file; ValueError naming the file if it cannot be opened."""
  from array_record.python.array_record_module import ArrayRecordReader
  try:
    r = ArrayRecordReader(path)
  except Exception as e:  # the C++ reader raises its own error type for a damaged file
    raise ValueError(f"token shard {path!r} is damaged or truncated and cannot be opened "
                     f"({str(e).splitlines()[0][:200]}); re-run `loopjax prepare`") from None
  try:
    return int(r.num_records())
  finally:
    r.close()


def manifest_path(out_dir: str) -> str:
  return storage.join(out_dir, "manifest.json")


def load_manifest(out_dir: str) -> dict:
  """The manifest of a prepared corpus (a local folder or a gs:// URL); ValueError if `out_dir`
  is not one."""
  path = storage.join(storage.resolve(out_dir), "manifest.json")
  if not storage.isfile(path):
    raise ValueError(f"{out_dir!r} is not a prepared corpus: no manifest.json in it (make one "
                     "with `loopjax prepare --input ... --tokenizer ... --out DIR`; an "
                     "interrupted prepare writes its manifest only when it finishes)")
  try:
    m = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path!r} is not valid JSON ({e.msg})") from None
  if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path!r} is not a {FORMAT} manifest of version {FORMAT_VERSION} "
                     f"(format {m.get('format')!r}, version {m.get('format_version')!r})")
  return m


def split_entries(out_dir: str, manifest: dict, split: str) -> list[dict]:
  """The manifest entries of `split`'s shards; ValueError if the corpus has no such split."""
  if split not in manifest["splits"]:
    raise ValueError(f"prepared corpus {out_dir!r} has no split {split!r} "
                     f"(has {sorted(manifest['splits'])})")
  return list(manifest["splits"][split]["shards"])


def check_shard(name: str, local: str, entry: dict, *, full_hash: bool = False) -> None:
  """Checks the shard file `local` (whose name in the corpus is `name`) against its manifest
  entry: size and record count always, sha256 when `full_hash`. ValueError naming it."""
  if not os.path.isfile(local):
    raise ValueError(f"token shard {name!r} listed in the manifest is missing")
  size = os.path.getsize(local)
  if size != entry["bytes"]:
    raise ValueError(f"token shard {name!r} has {size} bytes, the manifest says "
                     f"{entry['bytes']}: it is truncated or was replaced; re-run prepare")
  n = num_records(local)
  if n != entry["docs"]:
    raise ValueError(f"token shard {name!r} holds {n} records, the manifest says "
                     f"{entry['docs']}; re-run prepare")
  if full_hash and file_sha256(local) != entry["sha256"]:
    raise ValueError(f"token shard {name!r} does not match its sha256 in the manifest; "
                     "re-run prepare")


def check_shards(out_dir: str, manifest: dict, split: str, *, full_hash: bool = False):
  """Paths of `split`'s shards in a local corpus, each checked (see check_shard)."""
  paths = []
  for s in split_entries(out_dir, manifest, split):
    path = os.path.join(out_dir, s["path"])
    check_shard(path, path, s, full_hash=full_hash)
    paths.append(path)
  return paths


def stats(out_dir: str) -> str:
  """Token counts per split and a log2 histogram of document lengths (reads every shard's
  record sizes, one shard at a time)."""
  from array_record.python.array_record_module import ArrayRecordReader
  if storage.is_remote(out_dir):
    raise ValueError(f"--stats {out_dir}: reads a local corpus (the shards' record sizes); run it "
                     "on the folder prepare wrote, or on a copy")
  m = load_manifest(out_dir)
  item = np.dtype(m["dtype"]).itemsize
  lines = [f"{out_dir}: tokenizer {m['tokenizer'].get('spec', m['tokenizer']['type'])} "
           f"(vocab {m['tokenizer']['vocab_size']}), {m['dtype']}"]
  for split, info in m["splits"].items():
    lines.append(f"  {split}: {info['docs']:,} documents, {info['tokens']:,} tokens, "
                 f"{len(info['shards'])} shards")
    counts = np.zeros(33, np.int64)
    for path in check_shards(out_dir, m, split):
      r = ArrayRecordReader(path)
      try:
        for start in range(0, r.num_records(), 4096):
          recs = r.read(list(range(start, min(start + 4096, r.num_records()))))
          lens = np.array([len(x) // item for x in recs])
          np.add.at(counts, np.minimum(np.ceil(np.log2(np.maximum(lens, 1))), 32).astype(int),
                    1)
      finally:
        r.close()
    if counts.sum():
      used = [i for i in range(33) if counts[i]]
      lines.append("    document length (tokens)   documents")
      for i in range(used[0], used[-1] + 1):
        lo = 0 if i == 0 else 2 ** (i - 1) + 1
        lines.append(f"    {lo:>10,}..{2 ** i:<12,} {counts[i]:>12,}")
  return "\n".join(lines)
