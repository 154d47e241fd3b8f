"""Rows of text: the packing rules of every source, and one padded document per row.

Layouts (`LAYOUTS`) of a stream of documents, each already ending in EOS:
  document  the stream cut every seq_len tokens; segment ids number the documents inside a row
            from 1 (a document cut at a row boundary goes on, as segment 1, in the next row),
            so attention stays within a document.
  concat    the same rows, segment ids 1 on every real position (attention across documents).
  mdlm      MDLM's wrap: each row is BOS + the next seq_len - 2 stream tokens + EOS, segment
            ids 1 (attention across documents).
Only the last row of a finite stream is short: its tail is padding (segment id 0, fixed,
unscored); a short mdlm row ends BOS .. EOS before its padding. `Cursor` and `fill_row` make
these rows one at a time from any document stream (the prepared source's slots, zero-shot
corpora); `pack_documents` packs a list of documents.

The text and tfds sources make the document / concat rows with grain's
`ConcatThenSplitIterDataset` (its resumable state is grain's), mapped by `packed_to_row`: the
same rows as `fill_row` for the same stream (tests/test_packing.py).

Multi-process invariance: a global batch of G rows is built from G independent packing
*slots*. Slot s packs documents s, s+G, s+2G, ... of the (shuffled, repeated) document
stream, and row s of every global batch is the next row of slot s. A process that owns rows
[a, b) of each global batch runs only slots a..b-1, so the union of all processes' local
batches is the single-process global batch, and no process tokenizes another's documents.
"""

from __future__ import annotations

import functools

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, ZipIterDataset

from loopjax.data.batch import make_row, stack_rows

LAYOUTS = ("document", "concat", "mdlm")
_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def check_layout(layout: str, *, seq_len: int, bos_id: int | None, eos_id: int | None,
                 key: str = "layout") -> None:
  """ValueError unless `layout` is one of LAYOUTS and has the tokens it needs."""
  if layout not in LAYOUTS:
    raise ValueError(f"{key} must be one of {LAYOUTS}, got {layout!r}")
  if layout == "mdlm" and (seq_len < 3 or bos_id is None or eos_id is None):
    raise ValueError(f"{key}=mdlm needs data.seq_len >= 3 (got {seq_len}) and a tokenizer "
                     "with BOS and EOS; use the document layout otherwise")


class Cursor:
  """A position in a document stream: the index of the current document and how many of its
  tokens were already emitted (the resumable state of one packing stream)."""

  def __init__(self, doc: int = 0, offset: int = 0):
    self.doc, self.offset = int(doc), int(offset)

  def fill(self, out: np.ndarray, segments: np.ndarray | None, document) -> int:
    """Writes the next stream tokens into `out`; `document(j)` is document j (int32, its EOS
    included; IndexError past the end of the stream). `segments` (if given) gets the 1-based
    number of each token's document inside `out`. Returns the tokens written (< out.size only
    at the end of the stream)."""
    pos, segment = 0, 1
    while pos < out.size:
      try:
        d = document(self.doc)
      except IndexError:
        break
      take = min(out.size - pos, d.size - self.offset)
      out[pos:pos + take] = d[self.offset:self.offset + take]
      if segments is not None:
        segments[pos:pos + take] = segment
      pos += take
      self.offset += take
      if self.offset >= d.size:
        self.doc, self.offset, segment = self.doc + 1, 0, segment + 1
    return pos


def fill_row(cursor: Cursor, document, tokens_L: np.ndarray, segments_L: np.ndarray, *,
             layout: str, bos_id: int | None, eos_id: int | None, pad_id: int) -> int:
  """Fills one row of `layout` from the stream at `cursor` (see the module docstring) and
  returns its real length: seq_len for a full row, less for the last one (0: stream ended)."""
  if layout == "mdlm":
    n = cursor.fill(tokens_L[1:-1], None, document)
    real = n + 2 if n else 0
    if real:
      tokens_L[0], tokens_L[real - 1] = bos_id, eos_id
  else:
    real = cursor.fill(tokens_L, segments_L if layout == "document" else None, document)
  if layout != "document":
    segments_L[:real] = 1
  tokens_L[real:], segments_L[real:] = pad_id, 0
  return real


def pack_documents(docs_ids, *, seq_len: int, layout: str, pad_id: int,
                   bos_id: int | None = None, eos_id: int | None = None,
                   max_rows: int = 0) -> list[dict]:
  """Rows (batch format, no batch axis) of the token-id arrays `docs_ids` (each ending in EOS)
  in `layout`, the last one padded; at most `max_rows` (0: all)."""
  check_layout(layout, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id)
  docs_ids = [np.asarray(d, np.int32) for d in docs_ids]
  cursor, rows = Cursor(), []
  while not max_rows or len(rows) < max_rows:
    tokens, segments = np.empty(seq_len, np.int32), np.empty(seq_len, np.int32)
    real = fill_row(cursor, docs_ids.__getitem__, tokens, segments, layout=layout,
                    bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    if not real:
      break
    rows.append(make_row(tokens, fixed=segments == 0, loss_mask=segments > 0,
                         segment_ids=segments))
    if real < seq_len:
      break
  return rows


def packed_to_row(element: dict, *, pad_id: int, document_attention: bool) -> dict:
  """ConcatThenSplit output -> a row in the batch format."""
  seg = np.asarray(element["tokens_segment_ids"], np.int32)
  real = seg > 0
  return make_row(np.where(real, element["tokens"], pad_id), fixed=~real, loss_mask=real,
                  segment_ids=seg if document_attention else real.astype(np.int32))


def padded_row(ids: np.ndarray, *, seq_len: int, pad_id: int) -> dict:
  """One document per row: truncated to `seq_len`, padded with `pad_id` (fixed, unscored)."""
  ids = np.asarray(ids, np.int32)[:seq_len]
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:ids.size] = ids
  real = np.arange(seq_len) < ids.size
  return make_row(tokens, fixed=~real, loss_mask=real, segment_ids=real.astype(np.int32))


def _as_feature(ids: np.ndarray) -> dict:
  return {"tokens": np.asarray(ids, np.int32)}


def packed_stream(token_docs: grain.MapDataset, *, seq_len: int, pad_id: int,
                  document_attention: bool) -> grain.IterDataset:
  """One packing stream over `token_docs` (a MapDataset of int32 id arrays), in order."""
  features = token_docs.map(_as_feature).to_iter_dataset(_NO_THREADS)
  packed = ConcatThenSplitIterDataset(features, length_struct={"tokens": seq_len})
  return packed.map(functools.partial(packed_to_row, pad_id=pad_id,
                                      document_attention=document_attention))


def _stack(rows: tuple) -> dict:
  return stack_rows(rows)


def packed_batches(token_docs: grain.MapDataset, *, seq_len: int, pad_id: int,
                   document_attention: bool, global_batch_size: int, first_row: int,
                   num_rows: int) -> grain.IterDataset:
  """Local batches made of rows [first_row, first_row + num_rows) of each global batch."""
  slots = [
      packed_stream(token_docs[s::global_batch_size], seq_len=seq_len, pad_id=pad_id,
                    document_attention=document_attention)
      for s in range(first_row, first_row + num_rows)
  ]
  return ZipIterDataset(slots).map(_stack)
