"""Corpora read through Hugging Face `datasets`, as inputs of `loopjax prepare`.

An input `datasets:NAME[:CONFIG][@SPLIT]` (split default "train") names
  - a Hub dataset id (`datasets:openwebtext`, `datasets:wikitext:wikitext-103-raw-v1@test`),
    streamed (`load_dataset(..., streaming=True)`: rows arrive while the files download, nothing
    is materialised); with HF_HUB_OFFLINE set it is read from the `datasets` cache instead
    (`HF_DATASETS_CACHE`, filled by an earlier online `load_dataset`);
  - a local folder: one written by `Dataset.save_to_disk` (read with `load_from_disk`), or a
    folder of data files (JSON Lines, Parquet, CSV, text, Arrow) that `load_dataset(FOLDER)`
    reads, streamed.
The document is the string column `text_field`; documents are stripped and empty ones skipped,
as for corpus files. Requires `pip install loopjax[hf]` (datasets).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from loopjax.hf import hub

PREFIX = "datasets:"
INSTALL_HINT = "pip install loopjax[hf]"


def is_spec(name) -> bool:
  return isinstance(name, str) and name.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str | None, str]:
  """(name or folder, config or None, split) of a `datasets:` input."""
  body = spec[len(PREFIX):].strip()
  body, _, split = body.rpartition("@") if "@" in body else (body, "", "train")
  name, config = body, None
  if not os.path.exists(os.path.expanduser(body)) and ":" in body:
    name, _, config = body.partition(":")
  if not name or not split:
    raise ValueError(f"--input {spec!r}: expected datasets:NAME[:CONFIG][@SPLIT], e.g. "
                     "datasets:wikitext:wikitext-103-raw-v1@train or datasets:/data/owt")
  return name, config or None, split


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return (lines[0] if lines else type(e).__name__)[:200]


def open_rows(spec: str):
  """The rows of the split: a `datasets` Dataset or IterableDataset (see the module doc)."""
  try:
    import datasets
  except ImportError:
    raise ValueError(f"--input {spec}: reading through Hugging Face datasets needs the "
                     f"`datasets` package: {INSTALL_HINT}") from None
  name, config, split = parse(spec)
  local = os.path.expanduser(name)
  try:
    if os.path.isdir(local) and any(os.path.isfile(os.path.join(local, f))
                                    for f in ("state.json", "dataset_dict.json")):
      ds = datasets.load_from_disk(local)
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise ValueError(f"--input {spec}: no split {split!r} in {local} (splits: "
                           f"{sorted(ds)})")
        ds = ds[split]
      return ds
    streaming = os.path.isdir(local) or not hub.offline()
    return datasets.load_dataset(local if os.path.isdir(local) else name, config, split=split,
                                 streaming=streaming)
  except ValueError as e:
    if str(e).startswith("--input"):
      raise
    raise ValueError(f"--input {spec}: {_first_line(e)}") from None
  except (ConnectionError, FileNotFoundError, OSError) as e:
    where = "the datasets cache (HF_DATASETS_CACHE) and HF_HUB_OFFLINE is set" if hub.offline() \
        else "reachable"
    raise ValueError(f"--input {spec}: dataset {name!r} is not in {where} "
                     f"({_first_line(e)}); load it once online (datasets.load_dataset) or give "
                     "a local folder: datasets:/path/to/folder") from None


def iter_documents(spec: str, *, text_field: str = "text") -> Iterator[str]:
  """The non-empty documents of a `datasets:` input, in the dataset's order."""
  rows = open_rows(spec)
  columns = getattr(rows, "column_names", None)
  if columns is not None and text_field not in columns:
    raise ValueError(f"--input {spec}: no column {text_field!r} (columns: {columns}); pass "
                     "--text-field COLUMN")
  for row in rows:
    if text_field not in row:
      raise ValueError(f"--input {spec}: no column {text_field!r} (columns: {sorted(row)}); "
                       "pass --text-field COLUMN")
    value = row[text_field]
    if value is not None and str(value).strip():
      yield str(value).strip()
