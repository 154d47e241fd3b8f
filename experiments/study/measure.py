"""The FLOP multiplier, the gap at equal FLOPs and the reference curve's end slope.

A curve is a list of (training FLOPs, held-out NELBO) points of one run. The reference (the
MDM) is made monotone by its running minimum (a longer run is at least as good as its best
checkpoint so far) and read by linear interpolation in ln(FLOPs).

M(B) = F_ref(y) / B, where y is the compared model's NELBO at budget B and F_ref(y) the FLOPs
at which the reference first reaches y. M > 1: the compared model saves FLOPs; M < 1: it
needs more. When y lies outside the reference curve the value is censored and reported as a
bound: y below every reference point gives M > F_last / B, y above every point M < F_first / B.
"""

from __future__ import annotations

import math

import numpy as np


def _ref(curve):
  """(ln FLOPs, running-minimum NELBO), sorted by FLOPs."""
  pts = sorted((float(f), float(v)) for f, v in curve)
  x = np.log([f for f, _ in pts])
  if not np.all(np.diff(x) > 0):
    raise ValueError("the reference curve needs distinct FLOP values")
  return x, np.minimum.accumulate([v for _, v in pts])


def flops_to_reach(ref_curve, target: float) -> tuple[float, str]:
  """(FLOPs, relation): where the reference first reaches NELBO `target`; relation "=" inside
  the curve, ">" when even its last point is worse (FLOPs = last point), "<" when its first
  point is already better (FLOPs = first point)."""
  x, y = _ref(ref_curve)
  if target < y[-1]:
    return float(math.exp(x[-1])), ">"
  if target >= y[0]:
    return float(math.exp(x[0])), "=" if target == y[0] else "<"
  i = int(np.argmax(y <= target))  # first point at or below the target; i >= 1
  f = (y[i - 1] - target) / (y[i - 1] - y[i])
  return float(math.exp(x[i - 1] + f * (x[i] - x[i - 1]))), "="


def flop_multiplier(ref_curve, budget: float, nelbo: float) -> dict:
  """{"value", "bound"}: M at `budget` for a model with held-out `nelbo` there; bound is "="
  (measured), ">" (lower bound) or "<" (upper bound)."""
  f, rel = flops_to_reach(ref_curve, nelbo)
  return dict(value=f / budget, bound=rel)


def interpolate(ref_curve, flops: float) -> float | None:
  """The reference's NELBO at `flops` (linear in ln FLOPs); None outside its range."""
  x, y = _ref(ref_curve)
  lx = math.log(flops)
  if lx < x[0] - 1e-12 or lx > x[-1] + 1e-12:
    return None
  return float(np.interp(lx, x, y))


def end_slope(ref_curve, points: int = 3) -> float:
  """d NELBO / d ln(FLOPs) over the last `points` checkpoints (least squares)."""
  pts = sorted(ref_curve)[-points:]
  x = np.log([p[0] for p in pts])
  y = np.asarray([p[1] for p in pts], float)
  return float(np.polyfit(x, y, 1)[0])


def spread(values) -> dict:
  v = np.asarray(list(values), float)
  return dict(mean=float(v.mean()), min=float(v.min()), max=float(v.max()),
              std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n=int(len(v)))


def multiplier_stats(entries) -> dict:
  """Spread of per-seed multipliers; censored ones enter at their bound and are counted."""
  values = [e["value"] for e in entries]
  out = spread(values)
  out["censored"] = sum(e["bound"] != "=" for e in entries)
  out["bounds"] = [e["bound"] for e in entries]
  # The geometric mean is the natural centre of a ratio.
  out["geomean"] = float(np.exp(np.mean(np.log(values))))
  return out


def trend(entries) -> float | None:
  """d ln M / d ln(budget) over the measured (uncensored) multipliers of one seed, least
  squares; > 0: the model gains on the MDM as the budget grows. None with fewer than 2."""
  pts = [(math.log(e["budget"]), math.log(e["value"])) for e in entries if e["bound"] == "="]
  if len(pts) < 2 or len({x for x, _ in pts}) < 2:
    return None
  x, y = zip(*pts)
  return float(np.polyfit(x, y, 1)[0])
