"""Documents from local files, and their tokenization into token-id arrays.

Formats (chosen by extension):
  .txt      UTF-8 text. txt_split="paragraph" (default): one document per paragraph, i.e.
            per run of lines separated by one or more blank lines (single newlines stay
            inside the document). txt_split="line": one document per non-blank line
            (LM1B-style, one sentence per line).
  .jsonl    one JSON object per line; the document is the string field `text_field`.
  .parquet  the string column `text_field`.
Documents are stripped of surrounding whitespace; empty ones are skipped. The whole corpus is
read into memory (fine for local corpora; use the TFDS source for large ones).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

from loopjax.data.tokenizers import Tokenizer

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def check_vocab(max_id: int, vocab_size: int) -> None:
  """Raises ValueError if token id `max_id` does not fit a model vocabulary of `vocab_size`."""
  if max_id >= vocab_size:
    raise ValueError(
        f"token id {max_id} is >= the model vocab_size {vocab_size}: the tokenizer needs a "
        f"vocabulary of at least {max_id + 1} (set the model's vocab_size from "
        "loopjax.data.data_vocab_size(config.data))")


def _read_utf8(path: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} does not exist")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw:
    raise ValueError(f"data file {path!r} is empty")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"data file {path!r} is not valid UTF-8: byte offset {e.start} "
                     f"(byte 0x{raw[e.start]:02x}): {e.reason}") from None


def _txt_documents(path: str, txt_split: str) -> list[str]:
  text = _read_utf8(path).replace("\r\n", "\n")
  if txt_split == "paragraph":
    parts = _BLANK_LINES.split(text)
  elif txt_split == "line":
    parts = text.split("\n")
  else:
    raise ValueError(f"data.txt_split must be 'paragraph' or 'line', got {txt_split!r}")
  return [p.strip() for p in parts if p.strip()]


def _field(value, path: str, where: str, text_field: str) -> str:
  if not isinstance(value, str):
    raise ValueError(f"{path!r} {where}: field {text_field!r} is {type(value).__name__}, "
                     "not a string")
  return value


def jsonl_objects(path: str):
  """(line number, parsed value) of every non-blank line of a UTF-8 JSONL file; errors name
  the file and line."""
  for n, line in enumerate(_read_utf8(path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      yield n, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path!r} line {n}: invalid JSON ({e.msg})") from None


def _jsonl_documents(path: str, text_field: str) -> list[str]:
  docs = []
  for n, obj in jsonl_objects(path):
    if not isinstance(obj, dict) or text_field not in obj:
      keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise ValueError(f"{path!r} line {n}: no field {text_field!r} (has {keys}); set "
                       "data.text_field")
    docs.append(_field(obj[text_field], path, f"line {n}", text_field).strip())
  return [d for d in docs if d]


def _parquet_documents(path: str, text_field: str) -> list[str]:
  import pyarrow.parquet as pq
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} does not exist")
  if os.path.getsize(path) == 0:
    raise ValueError(f"data file {path!r} is empty")
  schema = pq.read_schema(path)
  if text_field not in schema.names:
    raise ValueError(f"{path!r}: no column {text_field!r} (has {schema.names}); set "
                     "data.text_field")
  values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
  docs = []
  for row, v in enumerate(values):
    if isinstance(v, bytes):
      try:
        v = v.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} row {row}: not valid UTF-8 at byte offset "
                         f"{e.start}") from None
    if v is not None:
      docs.append(_field(v, path, f"row {row}", text_field).strip())
  return [d for d in docs if d]


def read_documents(paths: Sequence[str], *, text_field: str = "text",
                   txt_split: str = "paragraph") -> list[str]:
  """All documents of `paths`, in file order (see the module docstring for formats)."""
  if isinstance(paths, str):
    paths = [paths]
  if not paths:
    raise ValueError("data.paths is empty: list the local .txt/.jsonl/.parquet files")
  docs = []
  for path in paths:
    path = os.path.expanduser(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
      found = _txt_documents(path, txt_split)
    elif ext == ".jsonl":
      found = _jsonl_documents(path, text_field)
    elif ext == ".parquet":
      found = _parquet_documents(path, text_field)
    else:
      raise ValueError(f"data file {path!r}: unsupported extension {ext!r} "
                       "(use .txt, .jsonl or .parquet)")
    if not found:
      raise ValueError(f"data file {path!r} contains no non-empty documents")
    docs.extend(found)
  return docs


def encode_document(tokenizer: Tokenizer, text: str, *, append_eos: bool = True) -> np.ndarray:
  """int32 token ids of one document, followed by EOS when the tokenizer has one."""
  ids = tokenizer.encode(text)
  if append_eos and tokenizer.eos_id is not None:
    ids = [*ids, tokenizer.eos_id]
  arr = np.asarray(ids, np.int32)
  if arr.size:
    check_vocab(int(arr.max()), tokenizer.vocab_size)
  return arr
