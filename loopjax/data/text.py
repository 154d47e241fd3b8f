"""The documents of the text source's files, and their tokenization into token-id arrays.

Files are read by corpus.py (.txt by paragraph or line, .jsonl, .parquet, .arrow, gzipped text).
The whole corpus is held in memory (fine for local corpora; `loopjax prepare` and the prepared
source for large ones).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from loopjax.data import corpus
from loopjax.data.tokenizers import Tokenizer


def check_vocab(max_id: int, vocab_size: int) -> None:
  """Raises ValueError if token id `max_id` does not fit a model vocabulary of `vocab_size`."""
  if max_id >= vocab_size:
    raise ValueError(
        f"token id {max_id} is >= the model vocab_size {vocab_size}: the tokenizer needs a "
        f"vocabulary of at least {max_id + 1} (set the model's vocab_size from "
        "loopjax.data.data_vocab_size(config.data))")


def read_documents(paths: Sequence[str], *, text_field: str = "text",
                   txt_split: str = "paragraph") -> list[str]:
  """All documents of `paths`, in file order, read by corpus.py (its docstring lists the
  formats); a file that is empty or holds no document is an error."""
  if isinstance(paths, str):
    paths = [paths]
  if not paths:
    raise ValueError("data.paths is empty: list the local .txt/.jsonl/.parquet files")
  docs = []
  for path in paths:
    path = os.path.expanduser(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
      raise ValueError(f"data file {path!r} is empty")
    found = list(corpus.iter_documents(path, text_field=text_field, txt_split=txt_split))
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
