"""A process's rows of each global batch when they are several shards of it.

The pipeline gives "shard i of n" the rows [i*G/n, (i+1)*G/n) of every global batch. On real
topologies one host's devices may hold several non-adjacent shards; the iterator here runs one
pipeline per shard and concatenates their rows (in the order the shards are given), so the
process sees exactly the rows a one-process run would put on its devices.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from loopjax.data.iterator import DataIterator
from loopjax.data.pipeline import make_eval_batches, make_train_iterator

STATE_VERSION = 1


class ShardsIterator(grain.DatasetIterator):
  """Several shards' iterators as one; the state is the list of their states."""

  def __init__(self, iterators: Sequence[DataIterator]):
    super().__init__(list(iterators))
    self._iterators = list(iterators)

  def __next__(self) -> dict:
    self._assert_not_closed()
    parts = [next(it) for it in self._iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "shards": [it.get_state() for it in self._iterators]}

  def set_state(self, state: dict[str, Any]) -> None:
    shards = state.get("shards") if isinstance(state, dict) else None
    if not isinstance(shards, list) or len(shards) != len(self._iterators):
      got = len(shards) if isinstance(shards, list) else "no"
      raise ValueError(f"data-iterator state holds {got} shard state(s); this process reads "
                       f"{len(self._iterators)} shards")
    for it, s in zip(self._iterators, shards):
      it.set_state(s)

  def close(self) -> None:
    if self._closed:
      return
    for it in self._iterators:
      it.close()
    super().close()


def make_shards_iterator(data_cfg, *, global_batch_size: int, seed: int,
                         shards: Sequence[tuple[int, int]]):
  """The training iterator of this process's shards [(index, count), ...]."""
  its = [make_train_iterator(data_cfg, global_batch_size=global_batch_size, seed=seed,
                             process_index=i, process_count=n) for i, n in shards]
  return its[0] if len(its) == 1 else ShardsIterator(its)


def make_shards_eval_batches(data_cfg, *, batch_size: int, num_batches: int, seed: int,
                             shards: Sequence[tuple[int, int]]) -> list[dict]:
  """Held-out batches (see make_eval_batches), this process's shards' rows concatenated."""
  per_shard = [make_eval_batches(data_cfg, batch_size=batch_size, num_batches=num_batches,
                                 seed=seed, process_index=i, process_count=n) for i, n in shards]
  return [{k: np.concatenate([s[b][k] for s in per_shard]) for k in per_shard[0][b]}
          for b in range(num_batches)]
