"""PNG plots of an evaluation sweep: quality vs loops S, and quality vs inference compute.

matplotlib with the Agg backend (no display, safe on servers and in tests). One function per
figure; each takes the rows `sweep.run_eval` writes to eval/*.json.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _is_fixed(row) -> bool:
  return str(row["loops"]).isdigit()


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_quality_vs_loops(rows, *, metric: str, path: str, group: str = "steps",
                          title: str = "") -> str:
  """One line per `group` value over fixed S; non-fixed policies (adaptive, schedules) as
  labelled markers at their mean executed loops."""
  fig, ax = plt.subplots(figsize=(6, 4))
  groups = sorted({r.get(group) for r in rows}, key=str)
  for g in groups:
    sub = [r for r in rows if r.get(group) == g and r.get(metric) is not None]
    fixed = sorted((int(r["loops"]), r[metric]) for r in sub if _is_fixed(r))
    label = f"{group} {g}" if g is not None else metric
    if fixed:
      ax.plot([s for s, _ in fixed], [v for _, v in fixed], "o-", label=label)
    for r in sub:
      if not _is_fixed(r) and r.get("loops_mean") is not None:
        ax.plot(r["loops_mean"], r[metric], "*", markersize=11, label=f"{r['loops']} ({label})")
  ax.set_xlabel("loops S (executed, mean per model call)")
  ax.set_ylabel(metric)
  ax.set_title(title or f"{metric} vs loops")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)


def plot_quality_vs_compute(rows, *, metric: str, path: str, flops_key: str = "flops_per_sample",
                            group: str = "steps", title: str = "") -> str:
  """Quality against inference FLOPs per sample (log x), one series per `group` value."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for g in sorted({r.get(group) for r in rows}, key=str):
    sub = [r for r in rows if r.get(group) == g and r.get(metric) is not None
           and r.get(flops_key)]
    fixed = sorted((r[flops_key], r[metric], r["loops"]) for r in sub if _is_fixed(r))
    label = f"{group} {g}" if g is not None else metric
    if fixed:
      ax.plot([f for f, _, _ in fixed], [v for _, v, _ in fixed], "o-", label=label)
      for f, v, s in fixed:
        ax.annotate(f"S={s}", (f, v), fontsize=6, textcoords="offset points", xytext=(2, 3))
    for r in sub:
      if not _is_fixed(r):
        ax.plot(r[flops_key], r[metric], "*", markersize=11, label=f"{r['loops']} ({label})")
  ax.set_xscale("log")
  ax.set_xlabel(flops_key.replace("_", " "))
  ax.set_ylabel(metric)
  ax.set_title(title or f"{metric} vs compute")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  return _save(fig, path)
