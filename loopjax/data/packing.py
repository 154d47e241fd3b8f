"""Rows of text: concatenate-and-chunk packing, or one padded document per row.

Packed rows come from grain's `ConcatThenSplitIterDataset`: documents (each already ending
in EOS) are concatenated and cut every `seq_len` tokens; a document cut at a row boundary
continues at the start of the next row of the same stream. `segment_ids` number the
documents inside a row from 1 (a continued document is 1 in the new row); 0 marks padding,
which only appears in the last row of a finite stream.

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

_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


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
