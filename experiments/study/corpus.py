"""The study's text: fortune-cookie files (Debian `fortunes`), one document per entry.

A fortune file holds entries separated by lines that are a single `%`. The held-out documents
are those whose content hash falls in loopjax.data.heldout's fixed bucket, so the held-out set
is the same for every model, seed and learning rate, and never depends on a training seed.
The split is written once as two JSONL files that the trainer's `text` source reads.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

from loopjax.data.batch import stack_rows
from loopjax.data.heldout import is_heldout
from loopjax.data.packing import packed_stream
from loopjax.data.text import encode_document
from loopjax.data.tokenizers import fill_id

HOW_TO_GET = (
    "apt-get download fortunes fortunes-min && mkdir -p ~/fortunes && "
    "for f in fortunes*.deb; do dpkg-deb -x $f ~/fortunes; done  "
    "(then pass --corpus ~/fortunes/usr/share/games/fortunes)")


def fortune_files(folder: str) -> list[str]:
  """The entry files of a fortunes folder: regular files, not the `.dat` indexes or links."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f"study corpus folder {folder!r} does not exist; get it offline-ready with: {HOW_TO_GET}")
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if not f.endswith(".dat") and not f.startswith(".")
                 and os.path.isfile(os.path.join(folder, f))
                 and not os.path.islink(os.path.join(folder, f)))
  if not files:
    raise FileNotFoundError(f"study corpus folder {folder!r} holds no fortune files; get them "
                            f"with: {HOW_TO_GET}")
  return files


def fortune_documents(folder: str) -> list[str]:
  """Every non-empty entry of every fortune file in `folder`, in file order."""
  docs = []
  for path in fortune_files(folder):
    with open(path, "rb") as f:
      text = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    entry = []
    for line in text.split("\n") + ["%"]:
      if line.strip() == "%":
        doc = "\n".join(entry).strip()
        if doc:
          docs.append(doc)
        entry = []
      else:
        entry.append(line)
  return docs


def write_split(folder: str, out_dir: str) -> dict:
  """train.jsonl and heldout.jsonl under `out_dir` (once); returns their paths and sizes."""
  paths = {k: os.path.join(out_dir, f"{k}.jsonl") for k in ("train", "heldout")}
  info_path = os.path.join(out_dir, "split.json")
  if os.path.exists(info_path):
    with open(info_path) as f:
      return json.load(f)
  docs = fortune_documents(folder)
  parts = {"train": [], "heldout": []}
  for d in docs:
    parts["heldout" if is_heldout(d) else "train"].append(d)
  os.makedirs(out_dir, exist_ok=True)
  for k, p in paths.items():
    with open(p, "w") as f:
      for d in parts[k]:
        f.write(json.dumps({"text": d}) + "\n")
  info = dict(source=os.path.abspath(folder), paths=paths,
              documents={k: len(v) for k, v in parts.items()},
              bytes={k: sum(len(d.encode()) for d in v) for k, v in parts.items()})
  with open(info_path, "w") as f:
    json.dump(info, f, indent=1)
  return info


def heldout_batches(heldout_path: str, tokenizer, *, seq_len: int, rows: int,
                    batch_size: int) -> list[dict]:
  """The first `rows` packed rows of the held-out documents (file order), in batches.

  Nothing here takes a seed: every model and seed is scored on these same rows."""
  with open(heldout_path) as f:
    docs = [json.loads(line)["text"] for line in f if line.strip()]
  token_docs = grain.MapDataset.source(docs).map(lambda d: encode_document(tokenizer, d))
  stream = iter(packed_stream(token_docs, seq_len=seq_len, pad_id=fill_id(tokenizer),
                              document_attention=True))
  out = []
  for row in stream:
    out.append(row)
    if len(out) == rows:
      break
  if len(out) < rows:
    raise ValueError(f"the held-out documents give {len(out)} rows of {seq_len} bytes, the "
                     f"preset asks for {rows}: lower the preset's eval_rows")
  n = rows // batch_size
  batches = [stack_rows(out[i * batch_size:(i + 1) * batch_size]) for i in range(n)]
  return [{k: np.asarray(v) for k, v in b.items()} for b in batches]
