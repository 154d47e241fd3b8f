"""Where training metrics go: metrics.jsonl, TensorBoard (tensorboardX) and a console line."""

from __future__ import annotations

import json
import math
import os
import sys
import time


def _jsonable(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsWriter:
  """Only process 0 writes (multi-host); the others get a writer that does nothing."""

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total = total_steps
    self._start = time.time()
    self._start_step = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def console(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    if self._start_step is None:
      self._start_step, self._start = step, time.time()
    done = step - self._start_step
    rate = done / max(time.time() - self._start, 1e-9)
    eta = (self.total - step) / rate if rate > 0 and done > 0 else float("nan")
    parts = [f"step {step}/{self.total}"]
    for k, fmt in (("loss", "{:.4f}"), ("eval_bits_per_token", "eval bits/tok {:.4f}"),
                   ("loops", "S {}"), ("lr", "lr {:.2e}"), ("tokens_per_sec", "{:,.0f} tok/s"),
                   ("mfu", "MFU {:.1%}")):
      if k in metrics:
        v = metrics[k]
        v = v.item() if hasattr(v, "item") else v
        parts.append(fmt.format(v) if isinstance(v, (int, float)) else f"{k} {v}")
    if done > 0:
      parts.append(f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
    print(" | ".join(parts), file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
