"""Loop counts as commands give them, and what a large one costs.

`--loops`: every command turns each value once into a LoopPolicy of the loaded model
(`loopjax.io.load.Loaded.policy`: `LoopPolicy.parse`, then resolved for the model): `0` or
`max` is S_max, the largest S of training (the model's default); `N >= 1` is S = N (S > S_max
included); a negative S is an error; policies (`adaptive:...`, `time:...`, `mask:...`).

A loop count above `loop_bound(S_max)` = min(8 * S_max, 256) logs a warning with the estimated
inference FLOPs per sample and a lower bound on the time at the device's peak, before anything
compiles (`warn_loop_cost`). `default_sweep` is the list of loop counts of a sweep (`eval`,
`analyze attention`) that names none.
"""

from __future__ import annotations

import logging

import jax

from loopjax.flops import inference_flops_per_sample, peak_flops_per_device

log = logging.getLogger("loopjax")

LOOP_WARN_FACTOR, LOOP_WARN_LIMIT = 8, 256


def default_sweep(s_max: int, looped: bool = True) -> list[int]:
  """The loop counts a sweep runs when none are named: powers of two below S_max, S_max and
  2 * S_max (1, 2, 4, 8, 12, 24 for S_max = 12); [1] for a model without a looped block."""
  if not looped:
    return [1]
  s_max = int(s_max)
  powers = [2 ** k for k in range(s_max.bit_length()) if 2 ** k < s_max]
  return [*powers, s_max, 2 * s_max]


def loop_bound(s_max: int) -> int:
  """The largest S run without a cost warning."""
  return min(LOOP_WARN_FACTOR * int(s_max), LOOP_WARN_LIMIT)


def warn_loop_cost(cfg, largest: int, *, length: int, calls: int, samples: int = 1,
                   device=None) -> str | None:
  """Logs (and returns) a warning when `largest` loops exceed `loop_bound(cfg.max_loops)`:
  inference FLOPs per sample for `calls` model calls over rows of `length`, and the time that
  `samples` such rows take at least at the device's peak FLOP/s. None below the bound."""
  if not cfg.looped or largest <= loop_bound(cfg.max_loops):
    return None
  flops = inference_flops_per_sample(cfg, length, largest, max(int(calls), 1))
  msg = (f"--loops: S = {largest} is {largest / cfg.max_loops:.0f}x this model's S_max "
         f"({cfg.max_loops}; the warning bound is {loop_bound(cfg.max_loops)}): about "
         f"{flops:.2e} FLOPs per sample ({calls} model call(s) of {length} tokens)")
  peak = peak_flops_per_device(device or jax.local_devices()[0], cfg.dtype)
  if peak:
    msg += (f", at least {_duration(flops * samples / peak)} for {samples} sample(s) at this "
            f"device's peak {peak:.1e} FLOP/s")
  log.warning(msg)
  return msg


def _duration(seconds: float) -> str:
  for unit, size in (("h", 3600.0), ("min", 60.0)):
    if seconds >= size:
      return f"{seconds / size:.1f} {unit}"
  return f"{seconds:.2g} s"
