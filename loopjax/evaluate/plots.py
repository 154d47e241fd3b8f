"""Plots of an evaluation sweep: quality vs loops S, and quality vs inference compute.

matplotlib with the Agg backend (no display, safe on servers and in tests). One function per
figure; each takes the rows `sweep.run_eval` writes to eval/*.json and writes PATH (PNG) with
an SVG and a PDF of the same figure beside it. Axes carry plain tick labels (no offset or
scientific offset text), S_max is a dotted vertical line when given, and rows that repeat a
(series, S) pair (several runs or seeds) are drawn as mean +- std error bars.

Fixed S are lines. Other policies (adaptive, schedules) are markers (a star, then P, X, ...) at
their executed compute:
`executed_loops_mean` / `executed_flops_per_sample` (what the batch ran) when the rows have
them, joined by a thin line to a hollow marker at the per-sequence figure (what each sequence
needed). A policy row without any loop or compute figure is a dashed horizontal line.
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import ScalarFormatter  # noqa: E402

VECTOR_FORMATS = (".svg", ".pdf")
POLICY_MARKERS = ("*", "P", "X", "D", "^", "v", "s")  # one per non-fixed policy of a series


def _is_fixed(row) -> bool:
  return str(row["loops"]).isdigit()


def _save(fig, path: str) -> str:
  """Writes PATH and its SVG / PDF siblings; returns PATH."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  stem = os.path.splitext(path)[0]
  for ext in VECTOR_FORMATS:
    fig.savefig(stem + ext)
  plt.close(fig)
  return path


def _plain_axis(axis) -> None:
  """Plain numbers on a linear axis: no offset ("+1e3") and no "x10^k" multiplier text."""
  fmt = ScalarFormatter(useOffset=False)
  fmt.set_scientific(False)
  axis.set_major_formatter(fmt)


def _mean_std(values):
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


def _fixed_series(rows, x_of, metric):
  """[(x, mean, std, n, S)] over fixed-S rows, one point per S (repeats averaged)."""
  by_s: dict = {}
  for r in rows:
    if _is_fixed(r) and x_of(r) is not None:
      by_s.setdefault(int(r["loops"]), []).append(r)
  out = []
  for s in sorted(by_s):
    rs = by_s[s]
    m, sd = _mean_std([r[metric] for r in rs])
    out.append((float(np.mean([x_of(r) for r in rs])), m, sd, len(rs), s))
  return out


def _policy_points(rows, metric):
  """{policy: rows} of the non-fixed rows, in first appearance order."""
  out: dict = {}
  for r in rows:
    if not _is_fixed(r):
      out.setdefault(str(r["loops"]), []).append(r)
  return out


def _draw_series(ax, rows, metric, label, x_exec, x_need, color):
  """One series: the fixed-S line (error bars over repeats), then every other policy as a star
  at x_exec(row) (executed) with a hollow marker at x_need(row) (per sequence) when they differ.
  x_* return None where a row has no such figure."""
  fixed = _fixed_series(rows, x_exec, metric)
  if fixed:
    xs, ms, sds, ns = ([p[i] for p in fixed] for i in range(4))
    runs = max(ns)
    ax.errorbar(xs, ms, yerr=sds if runs > 1 else None, fmt="o-", capsize=3, color=color,
                label=label + (f" (mean ± std, {runs} runs)" if runs > 1 else ""))
  for j, (spec, rs) in enumerate(_policy_points(rows, metric).items()):
    m, sd = _mean_std([r[metric] for r in rs])
    xe = [x_exec(r) for r in rs]
    if any(x is None for x in xe):
      ax.axhline(m, ls="--", lw=1, color=color, alpha=0.7, label=f"{spec} ({label}, no compute)")
      continue
    x = float(np.mean(xe))
    ax.errorbar([x], [m], yerr=[sd] if len(rs) > 1 else None,
                fmt=POLICY_MARKERS[j % len(POLICY_MARKERS)], markersize=11,
                capsize=3, color=color, label=f"{spec} ({label})")
    xn = [x_need(r) for r in rs]
    if all(v is not None for v in xn) and abs(np.mean(xn) - x) > 1e-9 * max(abs(x), 1.0):
      ax.plot([float(np.mean(xn)), x], [m, m], "-", lw=0.8, color=color, alpha=0.6)
      ax.plot([float(np.mean(xn))], [m], "o", mfc="none", color=color, markersize=7)


def _first(*vals):
  return next((v for v in vals if v is not None), None)


def _groups(rows, group):
  return sorted({r.get(group) for r in rows}, key=str)


def _finish(ax, metric, title, xlabel, s_max_x, note):
  if s_max_x is not None:
    ax.axvline(s_max_x, ls=":", color="0.3", lw=1.2, label="S_max (training)")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(metric.replace("_", " "))
  ax.set_title(title)
  _plain_axis(ax.yaxis)
  ax.grid(alpha=0.3, which="both")
  if note:
    ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=6, color="0.35", va="bottom")
  ax.legend(fontsize=7)


_NOTE = "filled markers: executed (batch) compute; hollow: per-sequence need"


def plot_quality_vs_loops(rows, *, metric: str, path: str, group: str = "steps",
                          title: str = "", s_max: int | None = None) -> str:
  """One line per `group` value over fixed S; other policies at their executed loops per model
  call (and their per-sequence mean); S_max as a vertical line."""
  rows = [r for r in rows if r.get(metric) is not None]
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  adaptive = False
  x_need = lambda r: _first(r.get("loops_mean"), int(r["loops"]) if _is_fixed(r) else None)
  x_exec = lambda r: _first(r.get("executed_loops_mean"), x_need(r))
  for k, g in enumerate(_groups(rows, group)):
    sub = [r for r in rows if r.get(group) == g]
    label = f"{group} {g}" if g is not None else metric.replace("_", " ")
    _draw_series(ax, sub, metric, label, x_exec, x_need, colors[k % len(colors)])
    adaptive |= any(not _is_fixed(r) and r.get("executed_loops_mean") is not None for r in sub)
  _plain_axis(ax.xaxis)
  _finish(ax, metric, title or f"{metric} vs loops", "loops S per model call (executed)",
          s_max, _NOTE if adaptive else "")
  return _save(fig, path)


def plot_quality_vs_compute(rows, *, metric: str, path: str, flops_key: str | None = None,
                            group: str = "steps", title: str = "",
                            s_max: int | None = None) -> str:
  """Quality against inference FLOPs per sample (log x), one series per `group` value.

  flops_key None: executed FLOPs (`executed_flops_per_sample`) where the rows have them, else
  `flops_per_sample`; policies also get a hollow marker at their per-sequence FLOPs. S_max is
  marked at the FLOPs of the fixed S = S_max row, when there is one."""
  rows = [r for r in rows if r.get(metric) is not None]
  executed_key = flops_key or "executed_flops_per_sample"
  needed_key = flops_key or "flops_per_sample"
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  s_max_x, adaptive = None, False
  x_need = lambda r: r.get(needed_key)
  x_exec = lambda r: _first(r.get(executed_key), x_need(r))
  for k, g in enumerate(_groups(rows, group)):
    sub = [r for r in rows if r.get(group) == g
           and (r.get(executed_key) is not None or r.get(needed_key) is not None
                or not _is_fixed(r))]
    label = f"{group} {g}" if g is not None else metric.replace("_", " ")
    color = colors[k % len(colors)]
    _draw_series(ax, sub, metric, label, x_exec, x_need, color)
    adaptive |= any(not _is_fixed(r) and r.get(executed_key) is not None for r in sub)
    for x, m, _, _, s in _fixed_series(sub, x_exec, metric):
      ax.annotate(f"S={s}", (x, m), fontsize=6, textcoords="offset points", xytext=(2, 3))
      if s_max is not None and s == s_max and s_max_x is None:
        s_max_x = x
  ax.set_xscale("log")
  label = (flops_key or "executed FLOPs per sample").replace("_", " ")
  _finish(ax, metric, title or f"{metric} vs compute", label, s_max_x,
          _NOTE if adaptive else "")
  return _save(fig, path)
