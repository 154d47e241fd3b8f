"""The batch format shared by every data source and consumed by the trainer.

A batch is a dict of NumPy arrays with a leading batch axis B and a length axis L:

  tokens       int32 [B, L]  clean token ids, all < vocab_size (the model's [MASK] id is
                             vocab_size and never appears in data)
  fixed        bool  [B, L]  True = never noised and never scored (Sudoku givens, prompts,
                             padding)
  loss_mask    bool  [B, L]  True = scored by the NELBO (False on padding and fixed cells)
  segment_ids  int32 [B, L]  1-based document id inside a packed row; 0 = padding
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

BATCH_KEYS = ("tokens", "fixed", "loss_mask", "segment_ids")


def make_row(tokens, *, fixed, loss_mask, segment_ids) -> dict[str, np.ndarray]:
  """One example (no batch axis) in the batch format, with canonical dtypes."""
  return {
      "tokens": np.asarray(tokens, np.int32),
      "fixed": np.asarray(fixed, bool),
      "loss_mask": np.asarray(loss_mask, bool),
      "segment_ids": np.asarray(segment_ids, np.int32),
  }


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch (adds the leading B axis)."""
  return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def slice_rows(batch: Mapping[str, np.ndarray], start: int, stop: int):
  """Rows [start, stop) of a batch."""
  return {k: batch[k][start:stop] for k in BATCH_KEYS}


def validate_batch(batch: Mapping[str, np.ndarray], *, vocab_size: int,
                   seq_len: int | None = None) -> None:
  """Raises ValueError if `batch` breaks the batch-format invariants."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing keys {missing}; has {sorted(batch)}")
  shape = batch["tokens"].shape
  if len(shape) != 2 or (seq_len is not None and shape[1] != seq_len):
    raise ValueError(f"tokens has shape {shape}; want [B, {seq_len or 'L'}]")
  for k in BATCH_KEYS:
    if batch[k].shape != shape:
      raise ValueError(f"{k} has shape {batch[k].shape}, tokens has {shape}")
  tokens = batch["tokens"]
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"token ids span [{tokens.min()}, {tokens.max()}], "
                     f"outside [0, {vocab_size})")
  if np.any(batch["loss_mask"] & batch["fixed"]):
    raise ValueError("some positions are both fixed and scored")
  if np.any((batch["segment_ids"] == 0) & ~batch["fixed"]):
    raise ValueError("padding positions (segment_ids == 0) must be fixed")
