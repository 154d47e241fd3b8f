"""The executor every inference policy shares (`run_loops`) and the loop statistics of a
sampler run (`batch_loops`, `time_table`); see loopjax.loops for per-sequence and executed
compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def batch_loops(loops_TxB):
  """Loops each model call executed for the whole batch: the max over its sequences (a
  `while_loop` over the batch stops with its slowest sequence). [T, B] -> [T]; 0 for calls a
  sampler skipped (cached)."""
  return jnp.max(jnp.asarray(loops_TxB), axis=-1, initial=0)


def time_table(loops_TxB, bins: int, *, how: str = "mean") -> str:
  """A "time:S1,...,Sk" spec from the loops a sampler run spent at each of its T steps.

  Step j of a T-step sampler runs at t = (T - j) / T, which falls in bin min(floor(t k), k - 1)
  of the schedule (the binning `LoopPolicy.bounds` uses). Each bin gets the per-sequence loops of
  its steps, aggregated by `how` ("mean": mean over steps and sequences; "max": the largest),
  rounded and at least 1; a bin no step falls in takes its nearer filled neighbour's value.
  Cached steps (0 loops everywhere) are ignored. Host-side NumPy: the result is a spec string.
  """
  loops = np.asarray(loops_TxB, np.float64)
  steps, k = loops.shape[0], int(bins)
  if k < 1 or steps < 1:
    raise ValueError(f"time_table: need bins >= 1 and at least one step, got {k}, {steps}")
  if how not in ("mean", "max"):
    raise ValueError(f"time_table: how must be 'mean' or 'max', got {how!r}")
  t_T = (steps - np.arange(steps)) / steps
  bin_T = np.minimum((t_T * k).astype(np.int64), k - 1)
  called_T = loops.max(-1) > 0
  table = [None] * k
  for j in range(k):
    sel = loops[(bin_T == j) & called_T]
    if sel.size:
      v = sel.mean() if how == "mean" else sel.max()
      table[j] = max(int(np.floor(v + 0.5)), 1)
  filled = [j for j in range(k) if table[j] is not None]
  if not filled:
    raise ValueError("time_table: no step executed any loop")
  table = [table[j] if table[j] is not None else table[min(filled, key=lambda f: abs(f - j))]
           for j in range(k)]
  return "time:" + ",".join(str(v) for v in table)


def relative_change(new_BxLxD, old_BxLxD, where_BxL):
  """||new - old|| / ||old|| per sequence over the positions `where` (0 when there are none)."""
  w = where_BxL.astype(jnp.float32)[..., None]
  num_B = jnp.sum(w * jnp.square(new_BxLxD - old_BxLxD), axis=(1, 2))
  den_B = jnp.sum(w * jnp.square(old_BxLxD), axis=(1, 2))
  return jnp.where(den_B > 0, jnp.sqrt(num_B / jnp.maximum(den_B, 1e-30)), 0.0)


def run_loops(step_fn, h_BxLxD, watch_BxL, min_B, max_B, tau):
  """Applies `step_fn(h, i) -> h` iteration by iteration, per sequence between min_B and max_B.

  A sequence stays active while i < max_B and (i < min_B or the relative change of its hidden
  state on the `watch` positions (the masked ones) is still >= tau). tau = 0 therefore runs
  exactly max_B iterations; a huge tau runs exactly min_B. Inactive sequences keep their state
  (`jnp.where`) but are still computed: the loop ends when none is active, so every row costs
  max(loops_B) iterations (`batch_loops`), whatever its own count.

  Returns (h_BxLxD, loops_B): the final state and the iterations each sequence's result took
  (int32); the iterations executed for the batch are loops_B.max().
  """
  min_B = jnp.asarray(min_B, jnp.int32)
  max_B = jnp.asarray(max_B, jnp.int32)
  tau = jnp.asarray(tau, jnp.float32)

  def cond(carry):
    return jnp.any(carry[2])

  def body(carry):
    i, h, active_B, loops_B = carry
    new = step_fn(h, i)
    change_B = relative_change(new, h, watch_BxL)
    h = jnp.where(active_B[:, None, None], new, h)
    loops_B = loops_B + active_B.astype(jnp.int32)
    i = i + 1
    active_B = active_B & (i < max_B) & ((i < min_B) | (change_B >= tau))
    return i, h, active_B, loops_B

  init = (jnp.int32(0), h_BxLxD, max_B >= 1, jnp.zeros_like(max_B))
  _, h, _, loops_B = jax.lax.while_loop(cond, body, init)
  return h, loops_B
