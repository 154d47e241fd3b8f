"""The one reader of text documents: raw corpus files streamed one at a time, in a fixed order
(`prepare`, the text source, zero-shot corpora and the JSONL task files all read through it).

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


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} does not exist")


def _text_lines(path: str) -> Iterator[str]:
  """The lines of a UTF-8 file (gzipped if it ends in .gz), split at "\n" and kept with it; an
  invalid byte is reported by its offset in the (decompressed) file."""
  _check_file(path)
  offset = 0
  with (gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")) as f:
    for raw in f:  # no UTF-8 multi-byte sequence contains the byte "\n"
      try:
        yield raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"data file {path!r} is not valid UTF-8: byte offset "
                         f"{offset + e.start} (byte 0x{raw[e.start]:02x}): {e.reason}") from None
      offset += len(raw)


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
                    f"{sorted(present)}); set data.text_field (prepare: --text-field)")


def _text(value, path: str, where: str, text_field: str) -> str:
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{path!r} {where}: not valid UTF-8 at byte offset {e.start}") from None
  if not isinstance(value, str):
    raise ValueError(f"{path!r} {where}: field {text_field!r} is {type(value).__name__}, "
                     "not a string")
  return value.strip()


def jsonl_objects(path: str) -> Iterator[tuple[int, object]]:
  """(line number, parsed value) of every non-blank line of a UTF-8 JSONL file; errors name
  the file and line."""
  for n, line in enumerate(_text_lines(path), start=1):
    if not line.strip():
      continue
    try:
      yield n, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path!r} line {n}: invalid JSON ({e.msg})") from None


def _jsonl(path: str, text_field: str) -> Iterator[str]:
  for n, obj in jsonl_objects(path):
    if not isinstance(obj, dict) or text_field not in obj:
      raise _missing(path, f"line {n}", text_field, obj if isinstance(obj, dict) else [])
    yield _text(obj[text_field], path, f"line {n}", text_field)


def _columns(path: str, kind: str):
  """(column names, record batches) of a Parquet or Arrow file; the batches are read lazily."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  _check_file(path)
  if kind == "parquet":
    f = pq.ParquetFile(path)
    return f.schema_arrow.names, lambda columns: f.iter_batches(batch_size=_BATCH_ROWS,
                                                                columns=columns)
  source = pa.memory_map(path)
  try:
    reader = pa.ipc.open_file(source)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
  except pa.ArrowInvalid:
    source.seek(0)
    reader = pa.ipc.open_stream(source)
    batches = iter(reader)
  return reader.schema.names, lambda columns: (b.select(columns) for b in batches)


def _column_batches(path: str, kind: str, text_field: str):
  """Record batches of column `text_field` of a Parquet or Arrow file."""
  names, batches = _columns(path, kind)
  if text_field not in names:
    raise _missing(path, "schema", text_field, names)
  return batches([text_field])


def _columnar(path: str, kind: str, text_field: str) -> Iterator[str]:
  row = 0
  for batch in _column_batches(path, kind, text_field):
    for v in batch.column(0).to_pylist():
      if v is not None:
        yield _text(v, path, f"row {row}", text_field)
      row += 1


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


def first_field(path: str, fields: Sequence[str]) -> str:
  """The first of `fields` that a JSONL file's first object or a Parquet/Arrow file's schema
  has (the last of `fields` when none, or for text files)."""
  have: set = set()
  kind = _kind(path)
  if kind == "jsonl":
    obj = next((o for _, o in jsonl_objects(path)), {})
    have = set(obj) if isinstance(obj, dict) else set()
  elif kind in ("parquet", "arrow"):
    have = set(_columns(path, kind)[0])
  return next((f for f in fields if f in have), fields[-1])


def input_name(path: str) -> str:
  """How an input is recorded: a file's absolute path, a `datasets:` input as given."""
  return path if hf_datasets.is_spec(path) else os.path.abspath(path)


def input_bytes(path: str) -> int:
  """An input's size for progress (0 for a `datasets:` input: unknown before reading)."""
  return 0 if hf_datasets.is_spec(path) else os.path.getsize(path)
