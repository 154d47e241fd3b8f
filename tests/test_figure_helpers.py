"""The helpers behind paper-ready figures and tables: confidence intervals (against float64 NumPy
references), human labels with units, and the placement of ticks and overlapping points."""

import math

import numpy as np
import pytest

from loopjax.evaluate import intervals, labels, plots


def _wilson_reference(p, n, z=intervals.Z95):
  """The Wilson bounds as the roots of (p - q)^2 = z^2 q (1 - q) / n in q."""
  a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
  return tuple(sorted(np.roots(np.array([a, b, c], np.float64)).real))


@pytest.mark.parametrize("p,n", [(0.5, 32), (0.9, 512), (0.03, 100), (0.0, 32), (1.0, 8)])
def test_wilson_interval_matches_the_quadratic_roots_and_stays_in_the_unit_interval(p, n):
  low, high = intervals.wilson_interval(p, n)
  ref = _wilson_reference(p, n)
  np.testing.assert_allclose([low, high], [max(ref[0], 0.0), min(ref[1], 1.0)], atol=1e-12)
  assert 0.0 <= low <= p <= high <= 1.0 and high - low > 0  # not empty at 0 or n correct


def test_wilson_interval_refuses_what_is_not_a_proportion():
  with pytest.raises(ValueError, match="n >= 1"):
    intervals.wilson_interval(0.5, 0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    intervals.wilson_interval(1.2, 10)


def test_weighted_standard_error_of_per_batch_estimates():
  rng = np.random.default_rng(0)
  v = rng.normal(2.0, 0.3, size=7)
  mean, se = intervals.weighted_mean_se(v)  # equal weights: std(ddof=1) / sqrt(k)
  assert mean == pytest.approx(float(np.mean(v)), abs=1e-12)
  assert se == pytest.approx(float(np.std(v, ddof=1) / math.sqrt(7)), abs=1e-12)
  w = rng.integers(100, 200, size=7).astype(np.float64)
  m1, s1 = intervals.weighted_mean_se(v, w)
  m2, s2 = intervals.weighted_mean_se(v, 3 * w)  # only the weights' ratios matter
  assert m1 == pytest.approx(float(np.sum(w * v) / np.sum(w))) and (m1, s1) == pytest.approx((m2, s2))
  assert intervals.weighted_mean_se([1.5], [10]) == (1.5, None)
  with pytest.raises(ValueError, match="non-negative weights"):
    intervals.weighted_mean_se([1.0, 2.0], [1.0])


def test_a_rows_interval_follows_what_the_metric_is():
  acc = {"exact_match": 0.25, "examples": 40, "cell_accuracy": 0.7}
  assert intervals.metric_interval(acc, "exact_match") == intervals.wilson_interval(0.25, 40)
  assert intervals.metric_interval(acc, "cell_accuracy") is None  # cells are not independent
  nelbo = {"bits_per_token": 1.5, "bits_per_token_se": 0.01}
  assert intervals.metric_interval(nelbo, "bits_per_token") == pytest.approx(
      (1.5 - 1.959964 * 0.01, 1.5 + 1.959964 * 0.01))
  assert intervals.metric_interval({"bits_per_token": 1.5}, "bits_per_token") is None


def test_labels_are_human_names_with_units_and_never_raw_keys():
  assert labels.metric_label("exact_match") == "exact match (fraction of problems)"
  assert labels.metric_label("nats_per_token") == "held-out NELBO (nats/token)"
  assert labels.metric_label("bits_per_token") == "held-out NELBO (bits/token)"
  assert labels.key_label("bits_per_token_se") == "held-out NELBO (bits/token) s.e."
  assert labels.key_label("executed_flops_per_sample") == "executed FLOPs/sample"
  assert labels.key_label("some_new_metric") == "some new metric"
  for key in list(labels.METRICS) + list(labels.KEYS):
    assert "_" not in labels.key_label(key), key
  assert labels.policy_label("4") == labels.policy_label("fixed:4") == "S = 4"
  assert labels.policy_label("adaptive:0.01") == "adaptive, τ = 0.01"
  assert labels.policy_label("adaptive:0.1:1:8") == "adaptive, τ = 0.1, S ≤ 8"
  assert labels.policy_label("time:2:8") == "time-scheduled S 2→8"


def test_coinciding_points_are_spread_and_axes_use_the_data_units():
  assert plots.dodge(0, 1) == 1.0
  assert [plots.dodge(k, 3, 0.1) for k in range(3)] == pytest.approx([0.9, 1.0, 1.1])
  xs = plots.spread_coinciding([4.0, 4.0, 4.0, 8.0], 0.1)
  assert xs == pytest.approx([3.6, 4.0, 4.4, 8.0])
  # Where a point of another kind sits (a fixed S), the coinciding ones all move right of it.
  assert plots.spread_coinciding([4.0, 4.0], 0.1, occupied=[4.0]) == pytest.approx([4.4, 4.8])
  assert plots.power_of_ten([2.77e11, 2.22e12]) == 12
  assert plots.power_of_ten([0.004]) == -3 and plots.power_of_ten([]) == 0


def test_tick_labels_at_the_data_s_are_thinned_only_where_they_would_overlap():
  assert plots.thin_ticks([1, 2, 3, 4, 6, 8, 16], log=True) == [1, 2, 3, 4, 6, 8, 16]
  assert plots.thin_ticks([1, 3, 6, 12], log=True) == [1, 3, 6, 12]
  many = plots.thin_ticks(list(range(1, 25)), log=True)
  assert many[0] == 1 and many[-1] == 24
  gaps = np.diff(np.log2(many)) / np.log2(24)
  assert gaps.min() >= 0.045 - 1e-12 and {1, 2, 3, 4, 6, 8, 12, 16}.issubset(many)


def test_attention_curves_that_repeat_each_other_are_recognised():
  from loopjax.evaluate.attention import same_prefixes
  assert same_prefixes([[0.4], [0.4, 0.43], [0.4, 0.43, 0.42]])
  assert not same_prefixes([[0.4], [0.41, 0.43]])


def test_a_small_spread_is_not_stretched_over_the_whole_axis():
  # 0.03 bits around 1.5: the axis spans at least 10 % of the values' size, about the middle.
  assert plots.widened_limits(1.49, 1.52, 1.52) == pytest.approx((1.429, 1.581))
  assert plots.widened_limits(0.2, 0.9, 1.0) == (0.2, 0.9)  # a large spread is left alone
