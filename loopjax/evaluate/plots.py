"""Plots of an evaluation sweep: quality vs loops S, and quality vs inference compute.

matplotlib with the Agg backend (no display, safe on servers and in tests). One function per
figure; each takes the rows `sweep.run_eval` writes to eval/*.json and writes PATH (PNG, 300 dpi)
with an SVG and a PDF of the same figure beside it, in a one-column paper style (`PAPER_STYLE`:
3.4 x 2.6 in, 8-pt text). Axes and legends carry human names with units
(loopjax/evaluate/labels.py), plain tick labels (no offset text), and on the loops axis ticks at
the S values the data has; S_max is a dotted vertical line when given. The y axis spans at
least 10 % of the values' size (of 1 for accuracies), so that a spread of 0.03 bits on 1.5 is
not drawn across the whole axis.

Uncertainty: a single row's metric gets its 95 % interval where the row says how uncertain it
is (loopjax/evaluate/intervals.py: Wilson over `examples` for per-example accuracies, +- 1.96
standard errors where the row has `<metric>_se`); rows that repeat a (series, S) pair (several
runs or seeds) are drawn as their mean with the range over the runs. The note under the plot
says which.

Fixed S are lines, one marker and line style per series, series offset a little along x on the
loops axis so that equal values stay visible. Other policies (adaptive, schedules) are markers
(a star, then P, X, ...) at their executed compute: `executed_loops_mean` /
`executed_flops_per_sample` (what the batch ran) when the rows have them, joined by a thin line
to a hollow marker at the per-sequence figure (what each sequence needed); policies that land on
the same point are spread apart along x. A policy row without any loop or compute figure cannot
be placed on the x axis: it is a dashed horizontal line, labelled as such.
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import (FixedLocator, NullFormatter, NullLocator,  # noqa: E402
                               ScalarFormatter)

from loopjax.evaluate import intervals, labels  # noqa: E402

VECTOR_FORMATS = (".svg", ".pdf")
POLICY_MARKERS = ("*", "P", "X", "D", "^", "v", "s")  # one per non-fixed policy of a series
SERIES_MARKERS = ("o", "s", "^", "D", "v", "P")
SERIES_LINES = ("-", "--", "-.", ":")
# One column of a two-column paper, print resolution.
PAPER_STYLE = {
    "figure.figsize": (3.4, 2.6), "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8,
    "legend.fontsize": 6.5, "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.2,
    "lines.markersize": 4, "errorbar.capsize": 2, "savefig.dpi": 300, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "grid.alpha": 0.3,
}
DODGE = 0.025  # the x offset between neighbouring series (fraction of x)
POLICY_DODGE = 0.07  # the x offset between policies that land on the same point
# The y axis spans at least this fraction of the values' size (of 1 for a fraction metric).
MIN_SPAN = 0.1


def _is_fixed(row) -> bool:
  return str(row["loops"]).isdigit()


def save_figure(fig, path: str) -> str:
  """Writes PATH and its SVG / PDF siblings; returns PATH."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # "tight": the legend above and the note under the axes (outside them) are kept, the axes
  # keep their size.
  fig.savefig(path, bbox_inches="tight", pad_inches=0.02)
  stem = os.path.splitext(path)[0]
  for ext in VECTOR_FORMATS:
    fig.savefig(stem + ext, bbox_inches="tight", pad_inches=0.02)
  plt.close(fig)
  return path


def plain_axis(axis) -> None:
  """Plain numbers on a linear axis: no offset ("+1e3") and no "x10^k" multiplier text."""
  fmt = ScalarFormatter(useOffset=False)
  fmt.set_scientific(False)
  axis.set_major_formatter(fmt)


def loop_axis(ax, s_values) -> None:
  """Ticks at the data's S values (not only powers of two), plain integers; a log2 axis when
  the values span a factor above 8, else linear."""
  s = sorted({int(v) for v in s_values})
  if not s:
    return
  log = s[-1] / max(s[0], 1) > 8
  if log:
    ax.set_xscale("log", base=2)
  ax.xaxis.set_major_locator(FixedLocator(thin_ticks(s, log)))
  ax.xaxis.set_minor_locator(NullLocator())
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))


def thin_ticks(values, log: bool, min_gap: float = 0.045) -> list:
  """`values` (sorted) less those closer than `min_gap` of the axis span (on a log axis, in log
  units) to a kept one, so that tick labels do not overlap. The ends are kept first, then
  powers of two, then the rest in order."""
  pos = dict(zip(values, np.log2(values) if log else np.asarray(values, float)))
  span = max(pos[values[-1]] - pos[values[0]], 1e-12)
  power = lambda v: v > 0 and float(v).is_integer() and (int(v) & (int(v) - 1)) == 0
  order = sorted(values, key=lambda v: (v not in (values[0], values[-1]), not power(v), v))
  kept = []
  for v in order:
    if all(abs(pos[v] - pos[k]) / span >= min_gap for k in kept):
      kept.append(v)
  return sorted(kept)


def widened_limits(low: float, high: float, scale: float, frac: float = MIN_SPAN) -> tuple:
  """(low, high) widened about their middle to at least `frac` x `scale` (the size of the
  values), so that a spread far below the values' size is not stretched over the whole axis."""
  need = frac * abs(scale)
  if high - low >= need:
    return low, high
  mid = (low + high) / 2
  return mid - need / 2, mid + need / 2


def power_of_ten(values) -> int:
  """k such that the largest |value| / 10**k is in [1, 10) (0 for no non-zero value): a shared
  axis unit, "(10^k)", for values that span less than a decade or two (FLOPs)."""
  top = max((abs(float(v)) for v in values), default=0.0)
  return int(np.floor(np.log10(top))) if top > 0 else 0


def flops_axis(ax, values, label: str):
  """A FLOPs axis: linear in units of 10^k when the values span at most 20x, so that the ticks
  carry readable numbers; else log with decade labels. Returns the divisor to plot x with."""
  vals = [float(v) for v in values if v is not None and v > 0]
  if vals and max(vals) / min(vals) <= 20:
    k = power_of_ten(vals)
    ax.set_xlabel(f"{label} ($10^{{{k}}}$)")
    plain_axis(ax.xaxis)
    return 10.0 ** k
  ax.set_xscale("log")
  ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no crowded minor labels
  ax.set_xlabel(label)
  return 1.0


def dodge(index: int, count: int, step: float = DODGE) -> float:
  """The multiplicative x offset of item `index` of `count` side by side (1.0 for one)."""
  return 1.0 + step * (index - (count - 1) / 2)


def spread_coinciding(xs, step: float = DODGE, occupied=()) -> list[float]:
  """x positions with points that coincide (within 0.1 %) spread apart around their value, or
  all to its right where a point of another kind already sits there (`occupied` x values)."""
  xs = [float(x) for x in xs]
  out = list(xs)
  same = lambda a, b: abs(a - b) <= 1e-3 * max(abs(a), abs(b), 1e-12)
  groups: dict = {}
  for i, x in enumerate(xs):
    key = next((k for k in groups if same(k, x)), x)
    groups.setdefault(key, []).append(i)
  for key, members in groups.items():
    taken = any(same(key, float(o)) for o in occupied)
    for j, i in enumerate(members):
      out[i] = xs[i] * (1.0 + step * (j + 1) if taken else dodge(j, len(members), step))
  return out


def point_error(rows, metric: str):
  """(mean, (below, above) or None, kind) of a metric over rows of one point: one row -> its
  95 % interval (kind "ci") where known; several -> the range over them (kind "range")."""
  vals = [float(r[metric]) for r in rows]
  m = float(np.mean(vals))
  if len(rows) > 1:
    return m, (m - min(vals), max(vals) - m), "range"
  ci = intervals.metric_interval(rows[0], metric)
  return m, (None if ci is None else (m - ci[0], ci[1] - m)), "ci" if ci else None


def _yerr(err):
  return None if err is None else [[err[0]], [err[1]]]


def _fixed_series(rows, x_of, metric):
  """[(x, mean, (below, above) or None, kind, runs, S)] over fixed-S rows, one point per S."""
  by_s: dict = {}
  for r in rows:
    if _is_fixed(r) and x_of(r) is not None:
      by_s.setdefault(int(r["loops"]), []).append(r)
  out = []
  for s in sorted(by_s):
    rs = by_s[s]
    m, err, kind = point_error(rs, metric)
    out.append((float(np.mean([x_of(r) for r in rs])), m, err, kind, len(rs), s))
  return out


def _policy_points(rows):
  """{policy: rows} of the non-fixed rows, in first appearance order."""
  out: dict = {}
  for r in rows:
    if not _is_fixed(r):
      out.setdefault(str(r["loops"]), []).append(r)
  return out


class _Kinds:
  """Which kinds of error bars a figure drew (for its note)."""

  def __init__(self):
    self.seen, self.runs = set(), 0
    self.policies = {}  # legend name -> marker of the policies drawn as points

  def add(self, kind, runs=1):
    if kind:
      self.seen.add(kind)
    self.runs = max(self.runs, runs)


def _draw_series(ax, rows, metric, label, x_exec, x_need, style, kinds, shift=1.0):
  """One series: the fixed-S line (x scaled by `shift`), then every other policy as a marker
  at x_exec(row) (executed) with a hollow marker at x_need(row) (per sequence) when they
  differ. x_* return None where a row has no such figure. Returns whether a policy was drawn at
  an executed figure."""
  color, marker, line = style
  fixed = _fixed_series(rows, x_exec, metric)
  if fixed:
    xs = [p[0] * shift for p in fixed]
    ms = [p[1] for p in fixed]
    errs = [p[2] for p in fixed]
    yerr = None
    if any(e is not None for e in errs):
      yerr = [[e[0] if e else 0.0 for e in errs], [e[1] if e else 0.0 for e in errs]]
    for p in fixed:
      kinds.add(p[3], p[4])
    ax.errorbar(xs, ms, yerr=yerr, marker=marker, ls=line, color=color, label=label)
  placed = False
  policies = list(_policy_points(rows).items())
  xe_all = []
  for spec, rs in policies:
    xe = [x_exec(r) for r in rs]
    xe_all.append(None if any(x is None for x in xe) else float(np.mean(xe)))
  known = [x for x in xe_all if x is not None]
  spread = iter(spread_coinciding(known, POLICY_DODGE, [p[0] for p in fixed]))
  for j, ((spec, rs), x) in enumerate(zip(policies, xe_all)):
    m, err, kind = point_error(rs, metric)
    if x is None:
      ax.axhline(m, ls="--", lw=0.8, color=color, alpha=0.7,
                 label=f"{labels.policy_label(spec)} (S not recorded)")
      continue
    kinds.add(kind, len(rs))
    xd = next(spread) * shift
    mark = POLICY_MARKERS[j % len(POLICY_MARKERS)]
    ax.errorbar([xd], [m], yerr=_yerr(err), fmt=mark, markersize=6, color=color)
    kinds.policies.setdefault(labels.policy_label(spec), mark)
    placed = True
    xn = [x_need(r) for r in rs]
    if all(v is not None for v in xn) and abs(np.mean(xn) - x) > 1e-9 * max(abs(x), 1.0):
      xn = float(np.mean(xn)) * shift
      ax.plot([xn, xd], [m, m], "-", lw=0.6, color=color, alpha=0.6)
      ax.plot([xn], [m], "o", mfc="none", color=color, markersize=5)
  return placed


def _first(*vals):
  return next((v for v in vals if v is not None), None)


def _groups(rows, group):
  """The values of `group` in the rows: numbers in numeric order, then the rest by name."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  return sorted({r.get(group) for r in rows},
                key=lambda v: (0, v, "") if number(v) else (1, 0, str(v)))


def _series_label(group: str, value, metric: str) -> str:
  if value is None:  # the only series
    return "fixed S"
  return f"{labels.key_label(group)} {value}" if group not in ("corpus", "task") else str(value)


def series_style(k: int):
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  return (colors[k % len(colors)], SERIES_MARKERS[k % len(SERIES_MARKERS)],
          SERIES_LINES[k % len(SERIES_LINES)])


def _note(kinds: _Kinds, rows, metric, policies_placed: bool, dodged: bool) -> str:
  parts = []
  if "ci" in kinds.seen:
    n = sorted({int(r["examples"]) for r in rows if r.get("examples")})
    parts.append(f"bars: 95% Wilson interval over {'/'.join(map(str, n))} examples"
                 if metric in intervals.PER_EXAMPLE and n else
                 "bars: 95% interval (±1.96 s.e. over batches)")
  if "range" in kinds.seen:
    parts.append(f"bars: range over {kinds.runs} runs (mean drawn)")
  if policies_placed:
    parts.append("filled: executed (batch) compute; hollow: per-sequence need")
  if dodged:
    parts.append("series offset slightly along x")
  return "\n".join(parts)


def _legend(ax, kinds: _Kinds, title: str) -> None:
  """Above the axes: the series (colour, marker, line) as drawn, then one grey entry per policy
  marker (the policy's points take their series' colour)."""
  pairs = list(zip(*ax.get_legend_handles_labels()))
  pairs.sort(key=lambda p: p[1].startswith("S_max"))  # the series first (a stable sort)
  handles, names = [p[0] for p in pairs], [p[1] for p in pairs]
  for name, mark in kinds.policies.items():
    handles.append(matplotlib.lines.Line2D([], [], marker=mark, ls="none", color="0.35",
                                           markersize=6))
    names.append(name)
  ncol = 1 if max(map(len, names), default=0) > 28 else 2
  ax.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, 1.01), ncol=ncol,
            title=title or None, borderaxespad=0.2, handlelength=2.2, columnspacing=1.0)


def _finish(ax, metric, title, xlabel, s_max_x, s_max, note, kinds):
  if s_max_x is not None:
    ax.axvline(s_max_x, ls=":", color="0.3", lw=1.0, label=f"S_max = {s_max} (training)")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(labels.metric_label(metric))
  low, high = ax.get_ylim()
  ax.set_ylim(*widened_limits(low, high, 1.0 if metric in intervals.PER_EXAMPLE
                              or metric.endswith("accuracy") else max(abs(low), abs(high))))
  plain_axis(ax.yaxis)
  ax.grid(which="major")
  _note_under(ax, note)
  _legend(ax, kinds, title)


def _note_under(ax, note: str) -> None:
  """`note` under the x label, one line per statement."""
  if note:
    ax.annotate(note, xy=(0, 0), xycoords="axes fraction", xytext=(-24, -30),
                textcoords="offset points", va="top", fontsize=5.5, color="0.35")


def legend_and_note(ax, note: str) -> None:
  """The legend above and the note under the axes, as the sweep plots have them."""
  _note_under(ax, note)
  _legend(ax, _Kinds(), "")


def plot_quality_vs_loops(rows, *, metric: str, path: str, group: str = "steps",
                          title: str = "", s_max: int | None = None) -> str:
  """One line per `group` value over fixed S; other policies at their executed loops per model
  call (and their per-sequence mean); S_max as a vertical line."""
  rows = [r for r in rows if r.get(metric) is not None]
  with plt.rc_context(PAPER_STYLE):
    fig, ax = plt.subplots()
    kinds, placed = _Kinds(), False
    x_need = lambda r: _first(r.get("loops_mean"), int(r["loops"]) if _is_fixed(r) else None)
    x_exec = lambda r: _first(r.get("executed_loops_mean"), x_need(r))
    groups = _groups(rows, group)
    for k, g in enumerate(groups):
      sub = [r for r in rows if r.get(group) == g]
      placed |= _draw_series(ax, sub, metric, _series_label(group, g, metric), x_exec, x_need,
                             series_style(k), kinds, shift=dodge(k, len(groups)))
    loop_axis(ax, [r["loops"] for r in rows if _is_fixed(r)] + ([s_max] if s_max else []))
    _finish(ax, metric, title, "loops S per model call (executed)", s_max, s_max,
            _note(kinds, rows, metric, placed, len(groups) > 1), kinds)
    return save_figure(fig, path)


def plot_quality_vs_compute(rows, *, metric: str, path: str, flops_key: str | None = None,
                            group: str = "steps", title: str = "",
                            s_max: int | None = None) -> str:
  """Quality against inference FLOPs per sample (`flops_axis`: linear in units of 10^k, or log
  when the FLOPs span more than 20x), one series per `group` value.

  flops_key None: executed FLOPs (`executed_flops_per_sample`) where the rows have them, else
  `flops_per_sample`; policies also get a hollow marker at their per-sequence FLOPs. S_max is
  marked at the FLOPs of the fixed S = S_max row, when there is one."""
  rows = [r for r in rows if r.get(metric) is not None]
  executed_key = flops_key or "executed_flops_per_sample"
  needed_key = flops_key or "flops_per_sample"
  with plt.rc_context(PAPER_STYLE):
    fig, ax = plt.subplots()
    s_max_x, kinds, placed = None, _Kinds(), False
    label = labels.key_label(flops_key) if flops_key else "executed inference FLOPs per sample"
    scale = flops_axis(ax, [_first(r.get(executed_key), r.get(needed_key)) for r in rows], label)
    x_need = lambda r: None if r.get(needed_key) is None else r[needed_key] / scale
    x_exec = lambda r: _first(None if r.get(executed_key) is None else r[executed_key] / scale,
                              x_need(r))
    for k, g in enumerate(_groups(rows, group)):
      sub = [r for r in rows if r.get(group) == g
             and (r.get(executed_key) is not None or r.get(needed_key) is not None
                  or not _is_fixed(r))]
      placed |= _draw_series(ax, sub, metric, _series_label(group, g, metric), x_exec,
                             x_need, series_style(k), kinds)
      for x, m, _, _, _, s in _fixed_series(sub, x_exec, metric):
        ax.annotate(f"S={s}", (x, m), fontsize=5.5, textcoords="offset points", xytext=(2, 3))
        if s_max is not None and s == s_max and s_max_x is None:
          s_max_x = x
    _finish(ax, metric, title, ax.get_xlabel(), s_max_x, s_max, _note(kinds, rows, metric, placed, False),
            kinds)
    return save_figure(fig, path)
