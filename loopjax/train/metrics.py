"""Training metrics: summed on device over the steps since the last logged row, then given to the
run's writers (metrics.jsonl, TensorBoard, W&B, ...: train/writers.py) and a console line.

A row holds window means (loss, bits/token, grad norm, masked fraction, scored tokens over the
window's finite steps), the mean S drawn, the loss and step count per drawn S (`loss_by_loops`,
`steps_by_loops`, keyed by S as a string), the learning rate of the row's step and the window's
throughput (tokens/s, step time, TFLOP/s and MFU from the FLOPs of the S each step drew).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from loopjax.train.writers import DEFAULT as DEFAULT_WRITERS, WriterContext, open_writers
from loopjax.train.writers import keep_rows_through  # noqa: F401  (where callers look for it)

# Per-step metrics whose window mean is logged (sums over finite steps).
MEAN_KEYS = ("loss", "bits_per_token", "grad_norm", "masked_fraction", "scored_tokens")


def window_zeros(max_loops: int) -> dict:
  """An empty window; the per-S arrays are indexed by S (index 0 unused)."""
  f32, i32 = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
  by_s = lambda dt: jnp.zeros((max_loops + 1,), dt)
  return {**{k: f32 for k in MEAN_KEYS}, "lr": f32, "steps": i32, "finite_steps": i32,
          "steps_by_loops": by_s(jnp.int32), "finite_by_loops": by_s(jnp.int32),
          "loss_by_loops": by_s(jnp.float32),
          "first_bad": i32, "first_bad_loss": f32, "first_bad_grad_norm": f32,
          "bad_run": i32, "longest_bad_run": i32}


def window_add(w: dict, m: dict) -> dict:
  """`w` with one step's metrics `m` added. Non-finite steps count in `steps` and per S (they
  cost compute) but not in the sums; `first_bad` is the window position (1-based) of the first;
  `bad_run` the non-finite steps in a row up to this one (carried over from the window before),
  `longest_bad_run` the longest such run that ended in this window."""
  ok, s = m["finite"], m["loops"]
  run = jnp.where(ok, 0, w["bad_run"] + 1)
  steps = w["steps"] + 1
  first = (~ok) & (w["first_bad"] == 0)
  keep = lambda old, new: jnp.where(first, jnp.asarray(new, jnp.float32), old)
  return {**{k: w[k] + jnp.where(ok, m[k], 0.0).astype(jnp.float32) for k in MEAN_KEYS},
          "lr": jnp.asarray(m["lr"], jnp.float32), "steps": steps,
          "finite_steps": w["finite_steps"] + ok.astype(jnp.int32),
          "steps_by_loops": w["steps_by_loops"].at[s].add(1),
          "finite_by_loops": w["finite_by_loops"].at[s].add(ok.astype(jnp.int32)),
          "loss_by_loops": w["loss_by_loops"].at[s].add(jnp.where(ok, m["loss"], 0.0)),
          "first_bad": jnp.where(first, steps, w["first_bad"]),
          "first_bad_loss": keep(w["first_bad_loss"], m["loss"]),
          "first_bad_grad_norm": keep(w["first_bad_grad_norm"], m["grad_norm"]),
          "bad_run": run, "longest_bad_run": jnp.maximum(w["longest_bad_run"], run)}


def window_means(w: dict) -> dict:
  """The logged means of a window fetched to the host (NaN where no step was finite)."""
  mean = lambda total, n: float(total) / int(n) if int(n) else float("nan")
  counts = np.asarray(w["steps_by_loops"])
  drawn = [int(s) for s in np.flatnonzero(counts)]
  row = {k: mean(w[k], w["finite_steps"]) for k in MEAN_KEYS}
  row["loops"] = float(counts @ np.arange(len(counts))) / max(int(counts.sum()), 1)
  row["loss_by_loops"] = {str(s): mean(w["loss_by_loops"][s], w["finite_by_loops"][s])
                          for s in drawn}
  row["steps_by_loops"] = {str(s): int(counts[s]) for s in drawn}
  row["lr"] = float(w["lr"])
  bad = int(w["steps"]) - int(w["finite_steps"])
  if bad:
    row["nonfinite_steps"] = bad
  return row


class ClosedWindow(NamedTuple):
  """A window cut at a logged step, not yet fetched."""
  step: int  # the last step in it
  sums: dict  # on device
  first_step: int
  t0: float  # perf_counter when its clock last restarted
  untimed: np.ndarray  # steps by S counted before that restart


class MetricsWindow:
  """The train metrics of the steps since the last row, summed on device (nothing per step
  leaves the device), and the wall clock of those steps for the throughput.

  `cut(step)` closes the window at a logged step and opens the next; `row(cut)` fetches a closed
  window (the one device-to-host copy per row) and restarts the clock. The caller dispatches the
  next step before `row`, so the device never waits for the host to log. `peek()` fetches the
  open window (before a checkpoint, to see whether its steps were finite);
  `restart_clock()` leaves the time until now (checkpoints, evaluation) out of the throughput.
  """

  def __init__(self, mesh, metrics_spec: dict, max_loops: int, start_step: int, *,
               flops_by_loops, tokens_per_step, peak_flops=None):
    """`metrics_spec`: the step's metrics as jax.ShapeDtypeStructs (compiled here, so that no
    compile time lands in the first row's throughput)."""
    rep = NamedSharding(mesh, P())
    self._zeros = jax.jit(functools.partial(window_zeros, max_loops), out_shardings=rep)()
    self._add = jax.jit(window_add).lower(self._zeros, metrics_spec).compile()
    self._flops = np.asarray(flops_by_loops, np.float64)  # indexed by S
    self._tokens, self._peak = tokens_per_step, peak_flops
    self._open(start_step + 1)

  def _open(self, first_step: int, bad_run=None) -> None:
    self.sums, self.first_step, self.steps = self._zeros, first_step, 0
    if bad_run is not None:  # a run of non-finite steps continues across windows
      self.sums = {**self._zeros, "bad_run": bad_run}
    self._seen = np.zeros_like(self._flops, np.int64)  # steps by S already fetched
    self.restart_clock()

  def restart_clock(self) -> None:
    self._t0, self._untimed = time.perf_counter(), self._seen

  def add(self, metrics: dict) -> None:
    self.sums = self._add(self.sums, metrics)
    self.steps += 1

  def cut(self, step: int) -> ClosedWindow:
    closed = ClosedWindow(step, self.sums, self.first_step, self._t0, self._untimed)
    self._open(step + 1, bad_run=closed.sums["bad_run"])
    return closed

  def row(self, closed: ClosedWindow) -> tuple[dict, dict | None]:
    """(row, first non-finite step or None) of a closed window; waits for its last step."""
    w = jax.device_get(closed.sums)
    elapsed = max(time.perf_counter() - closed.t0, 1e-9)
    self.restart_clock()
    row = window_means(w)
    timed = np.asarray(w["steps_by_loops"]) - closed.untimed
    work = float(timed @ self._flops)
    row["tokens_per_sec"] = self._tokens * int(timed.sum()) / elapsed
    row["step_time"] = elapsed / max(int(timed.sum()), 1)
    row["tflops_per_sec"] = work / elapsed / 1e12
    if self._peak:
      row["mfu"] = work / elapsed / self._peak
    return row, _first_bad(w, closed.first_step, closed.step)

  def peek(self) -> dict | None:
    """The first non-finite step of the open window, or None; fetches it (waits for it)."""
    if not self.steps:
      return None
    w = jax.device_get(self.sums)
    self._seen = np.asarray(w["steps_by_loops"], np.int64)
    return _first_bad(w, self.first_step, self.first_step + self.steps - 1)


def _first_bad(w: dict, first_step: int, last_step: int) -> dict | None:
  count = int(w["steps"]) - int(w["finite_steps"])
  if not count:
    return None
  return {"step": first_step + int(w["first_bad"]) - 1, "loss": float(w["first_bad_loss"]),
          "grad_norm": float(w["first_bad_grad_norm"]), "count": count, "last_step": last_step,
          "longest_run": int(w["longest_bad_run"])}


def eval_label(step: int, row: dict) -> str:
  """The console text of a row's raw and EMA held-out figures while the EMA warms up (after
  "eval")."""
  return (f"bits/tok raw {row['eval_raw_bits_per_token']:.4f} ema "
          f"{row['eval_bits_per_token']:.4f} (ema warming up: step {step} < "
          f"1/(1-{row['ema_decay']}) = {1 / (1 - row['ema_decay']):.0f})")


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsWriter:
  """The run's writers (train.writers, see train/writers.py) and its console line. Only process 0
  writes (multi-host); the others get a writer that does nothing."""

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool = True,
               start_step: int = 0, writers: str = DEFAULT_WRITERS, config=None):
    """start_step: the step the run starts (or resumes) from (metrics.jsonl drops later rows);
    config: the run's config, for writers that record it (W&B)."""
    self.enabled = enabled
    self.total = total_steps
    self._start = time.time()
    self._start_step = None
    self._writers = []
    if enabled:
      self._writers = open_writers(writers, WriterContext(workdir, start_step, config))

  def write(self, step: int, metrics: dict) -> None:
    for w in self._writers:
      w.write(int(step), metrics)

  def console(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    if self._start_step is None:
      self._start_step, self._start = step, time.time()
    done = step - self._start_step
    rate = done / max(time.time() - self._start, 1e-9)
    eta = (self.total - step) / rate if rate > 0 and done > 0 else float("nan")
    parts = [f"step {step}/{self.total}"]
    metrics = dict(metrics)
    if "eval_raw_bits_per_token" in metrics:  # the EMA is still warming up: both, labelled
      metrics["eval"] = eval_label(step, metrics)
      metrics.pop("eval_bits_per_token", None)
    for k, fmt in (("loss", "{:.4f}"), ("eval_bits_per_token", "eval bits/tok {:.4f}"),
                   ("eval", "{}"), ("loops", "S {:.2f}"), ("lr", "lr {:.2e}"),
                   ("tokens_per_sec", "{:,.0f} tok/s"),
                   ("mfu", "MFU {:.1%}")):
      if k in metrics:
        v = metrics[k]
        v = v.item() if hasattr(v, "item") else v
        parts.append(fmt.format(v) if isinstance(v, (int, float)) else f"{k} {v}")
    if done > 0:
      parts.append(f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
    print(" | ".join(parts), file=sys.stderr, flush=True)

  def close(self) -> None:
    for w in self._writers:
      w.close()
