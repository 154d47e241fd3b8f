"""What `sample`, `eval` and `analyze` share on the command line.

`--loops`: every command parses a loop count once, with `LoopPolicy.parse` (`parse_loops_arg`):
`0` or `max` is S_max, the largest S of training (the model's default); `N >= 1` is S = N (S >
S_max included); a negative S is an error; policies (`adaptive:...`, `time:...`, `mask:...`).

Cost: a loop count above `loop_bound(S_max)` = min(8 * S_max, 256) logs a warning with the
estimated inference FLOPs per sample and a lower bound on the time at the device's peak, before
anything compiles (`warn_loop_cost`).

Outputs (`output_dir`): a training workdir gets its results inside it (WORKDIR/eval,
WORKDIR/plots, WORKDIR/samples); an export folder is never written into: results go beside it,
to `<EXPORT>.outputs/` with the same eval/ plots/ samples/ layout; `--out DIR` overrides both.
"""

from __future__ import annotations

import logging
import os

import jax

from loopjax import folders
from loopjax.flops import inference_flops_per_sample, peak_flops_per_device
from loopjax.loops import LoopPolicy
from loopjax.weights import is_export

log = logging.getLogger("loopjax")

LOOP_WARN_FACTOR, LOOP_WARN_LIMIT = 8, 256
EXPORT_OUTPUT_SUFFIX = ".outputs"


def parse_loops_arg(spec, s_max: int) -> LoopPolicy:
  """One `--loops` value parsed (loopjax.loops.LoopPolicy.parse; `0` / `max` = S_max)."""
  return LoopPolicy.parse(spec, s_max)


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


def output_dir(path: str, out: str | None = None) -> str:
  """The folder a command reading the model at `path` writes its eval/, plots/ and samples/
  under: `out` when given; `<path>.outputs` beside an export folder; else the workdir itself."""
  if out:
    return out
  if is_export(path):
    return os.path.normpath(path) + EXPORT_OUTPUT_SUFFIX
  return path


def check_counts(*checks) -> None:
  """(flag, value, lowest allowed) triples: ValueError naming the first count below its bound,
  before any model is loaded."""
  for flag, value, low in checks:
    if value < low:
      raise ValueError(f"{flag} must be >= {low}, got {value}")


def claim_output_dir(path: str, out: str | None = None) -> str:
  """`output_dir(path, out)`, refused (one line, nothing written) when it holds an export, a
  prepared corpus or a study rather than a run or earlier outputs."""
  d = output_dir(path, out)
  folders.claim(d, "outputs", flag="--out" if out else "--workdir")
  return d
