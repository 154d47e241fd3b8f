"""Confidence intervals for the estimates that figures and tables show.

Accuracy over n examples (a binomial proportion): the Wilson score interval, which stays inside
[0, 1] and is not empty at 0 or n correct (the normal interval p +- z sqrt(p (1 - p) / n) is
both at the ends, where small evaluations often sit). A Monte-Carlo NELBO (a mean over batches,
each with its own random times and masks): the mean of the per-batch values and its standard
error, std / sqrt(number of batches), weighted by the tokens each batch scored.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95 % quantile of the standard normal

# Metrics that are a fraction of examples (one Bernoulli outcome per example): Wilson intervals.
# Per-cell or per-token accuracies are not: positions of one example are not independent.
PER_EXAMPLE = ("exact_match", "board_accuracy", "exact_board_accuracy")


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
  """(low, high) of the Wilson score interval for a proportion `p` observed over `n` trials."""
  if n <= 0:
    raise ValueError(f"a proportion needs n >= 1 trials, got n={n}")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"a proportion is in [0, 1], got {p}")
  z2 = z * z
  center = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return max(0.0, center - half), min(1.0, center + half)


def weighted_mean_se(values, weights=None) -> tuple[float, float | None]:
  """(mean, standard error of the mean) of per-batch estimates, weighted by `weights` (tokens);
  the error is None for a single value. Uses the effective number of batches
  (sum w)^2 / sum w^2, so equal weights give std(ddof=1) / sqrt(k)."""
  v = np.asarray(values, np.float64)
  w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
  if v.size == 0 or v.shape != w.shape or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"want equally many values and non-negative weights, got {v.size} values, "
                     f"weights {w.tolist()}")
  w = w / w.sum()
  mean = float(w @ v)
  if v.size < 2:
    return mean, None
  k_eff = 1.0 / float(w @ w)
  var = float(w @ (v - mean) ** 2) * k_eff / (k_eff - 1.0)  # unbiased, weighted
  return mean, math.sqrt(var / k_eff)


def metric_interval(row: dict, metric: str) -> tuple[float, float] | None:
  """(low, high) 95 % interval of `metric` in an eval row, or None when the row does not say
  how uncertain it is: Wilson over the row's `examples` for PER_EXAMPLE metrics; mean +- 1.96
  standard errors where the row has `<metric>_se`."""
  v = row.get(metric)
  if v is None:
    return None
  if metric in PER_EXAMPLE and row.get("examples"):
    return wilson_interval(float(v), int(row["examples"]))
  se = row.get(f"{metric}_se")
  if se is not None:
    return float(v) - Z95 * float(se), float(v) + Z95 * float(se)
  return None
