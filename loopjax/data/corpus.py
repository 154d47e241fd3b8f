"""Streaming documents from raw corpus files, one file at a time, in a fixed order.

Formats (chosen by extension; `.gz` is decompressed on the fly for .txt / .jsonl):
  .txt            UTF-8 text. txt_split="paragraph": one document per run of lines separated
                  by blank lines; txt_split="line": one document per non-blank line (LM1B).
  .jsonl          one JSON object per line; the document is the string field `text_field`.
  .parquet        the string column `text_field`, read one record batch at a time.
  .arrow          an Arrow IPC file or stream (what Hugging Face `datasets` keeps in its
                  cache), column `text_field`, memory-mapped and read one batch at a time.
`input_format` overrides the extension for every file (e.g. "txt" for LM1B's raw release
files, named news.en-00001-of-00100). An input `datasets:NAME[:CONFIG][@SPLIT]` is read through
Hugging Face `datasets` instead (a Hub dataset, streamed, or a local folder; hf_datasets.py). Documents are stripped of surrounding whitespace; empty ones are skipped. Nothing holds more
than one record batch (or one paragraph) of a file in memory.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence

from loopjax.data import hf_datasets

EXTENSIONS = (".txt", ".jsonl", ".parquet", ".arrow", ".txt.gz", ".jsonl.gz")
_BATCH_ROWS = 1024


def _kind(path: str) -> str | None:
  low = path.lower()
  for ext in sorted(EXTENSIONS, key=len, reverse=True):
    if low.endswith(ext):
      return ext.split(".")[1]
  return None


FORMATS = ("txt", "jsonl", "parquet", "arrow")


def _check_format(input_format: str | None) -> None:
  if input_format is not None and input_format not in FORMATS:
    raise ValueError(f"input format must be one of {FORMATS}, got {input_format!r}")


def list_inputs(paths: Sequence[str], input_format: str | None = None) -> list[str]:
  """The corpus files named by `paths` (files, or directories searched recursively), with
  directory contents in sorted order; raises ValueError if none is usable. With
  `input_format`, every non-hidden file counts, whatever its extension."""
  _check_format(input_format)
  usable = (lambda f: not os.path.basename(f).startswith(".")) if input_format else _kind
  if isinstance(paths, str):
    paths = [paths]
  if not paths:
    raise ValueError("no --input given: name corpus files or directories")
  found = []
  for p in paths:
    if hf_datasets.is_spec(p):
      found.append(p)
      continue
    p = os.path.expanduser(p)
    if os.path.isdir(p):
      inside = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs)
      found.extend(f for f in inside if usable(f))
    elif os.path.isfile(p):
      if not input_format and not _kind(p):
        raise ValueError(f"input {p!r}: unsupported file type (use {', '.join(EXTENSIONS)})")
      found.append(p)
    else:
      raise FileNotFoundError(f"input {p!r} does not exist")
  if not found:
    raise ValueError(f"no corpus files ({input_format or ', '.join(EXTENSIONS)}) under "
                     f"{list(paths)}")
  return found


def _text_lines(path: str) -> Iterator[str]:
  raw = gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
  with io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
    try:
      yield from f
    except UnicodeDecodeError as e:
      raise ValueError(f"{path!r} is not valid UTF-8 ({e.reason})") from None


def _txt(path: str, txt_split: str) -> Iterator[str]:
  if txt_split not in ("paragraph", "line"):
    raise ValueError(f"txt_split must be 'paragraph' or 'line', got {txt_split!r}")
  para = []
  for line in _text_lines(path):
    line = line.rstrip("\r\n")
    if txt_split == "line":
      if line.strip():
        yield line.strip()
    elif line.strip():
      para.append(line)
    elif para:
      yield "\n".join(para).strip()
      para = []
  if para:
    yield "\n".join(para).strip()


def _missing(path: str, where: str, text_field: str, present) -> ValueError:
  return ValueError(f"{path!r} {where}: no text field {text_field!r} (fields present: "
                    f"{sorted(present)}); pass --text-field")


def _jsonl(path: str, text_field: str) -> Iterator[str]:
  for n, line in enumerate(_text_lines(path), start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path!r} line {n}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or text_field not in obj:
      raise _missing(path, f"line {n}", text_field, obj if isinstance(obj, dict) else [])
    v = obj[text_field]
    if not isinstance(v, str):
      raise ValueError(f"{path!r} line {n}: field {text_field!r} is {type(v).__name__}, "
                       "not a string")
    yield v.strip()


def _column_batches(path: str, kind: str, text_field: str):
  """Record batches of column `text_field` of a Parquet or Arrow file."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  if kind == "parquet":
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    if text_field not in names:
      raise _missing(path, "schema", text_field, names)
    yield from f.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field])
    return
  source = pa.memory_map(path)
  try:
    reader = pa.ipc.open_file(source)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
  except pa.ArrowInvalid:
    source.seek(0)
    reader = pa.ipc.open_stream(source)
    batches = iter(reader)
  if text_field not in reader.schema.names:
    raise _missing(path, "schema", text_field, reader.schema.names)
  for b in batches:
    yield b.select([text_field])


def _columnar(path: str, kind: str, text_field: str) -> Iterator[str]:
  for batch in _column_batches(path, kind, text_field):
    for v in batch.column(0).to_pylist():
      if isinstance(v, bytes):
        v = v.decode("utf-8", "strict")
      if v is not None:
        yield v.strip()


def iter_documents(path: str, *, text_field: str = "text", txt_split: str = "paragraph",
                   input_format: str | None = None) -> Iterator[str]:
  """The non-empty documents of one corpus file (or `datasets:` input), in file order."""
  if hf_datasets.is_spec(path):
    return hf_datasets.iter_documents(path, text_field=text_field)
  _check_format(input_format)
  kind = input_format or _kind(path)
  if kind == "txt":
    docs = _txt(path, txt_split)
  elif kind == "jsonl":
    docs = _jsonl(path, text_field)
  elif kind in ("parquet", "arrow"):
    docs = _columnar(path, kind, text_field)
  else:
    raise ValueError(f"input {path!r}: unsupported file type (use {', '.join(EXTENSIONS)})")
  return (d for d in docs if d)


def check_input(path: str, *, text_field: str, txt_split: str,
                input_format: str | None = None) -> None:
  """Reads the first document of `path`, so a missing text field fails before any work."""
  next(iter_documents(path, text_field=text_field, txt_split=txt_split,
                      input_format=input_format), None)


def input_name(path: str) -> str:
  """How an input is recorded: a file's absolute path, a `datasets:` input as given."""
  return path if hf_datasets.is_spec(path) else os.path.abspath(path)


def input_bytes(path: str) -> int:
  """An input's size for progress (0 for a `datasets:` input: unknown before reading)."""
  return 0 if hf_datasets.is_spec(path) else os.path.getsize(path)
