"""The study's numbers as statistics over seeds, the paper's claims with verdicts, tables, plots.

Verdict rule (for every claim): with one value per seed for each side, a claim is `reproduced`
when every seed favours it by more than the noise floor, `not reproduced` when every seed goes
against it by more than the floor, and `inconclusive` otherwise. Paired comparisons (the same
LoopMDM at two inference settings) compare per seed; unpaired ones (two models) need the two
seed ranges to be apart by the floor. The floor for an accuracy is one binomial standard error
of the held-out problems, sqrt(p (1 - p) / n); for bits per token it is 0.
"""

from __future__ import annotations

import math
import os

import numpy as np

from loopjax.evaluate import labels, plots
from loopjax.evaluate.intervals import wilson_interval

PAPER = {  # arXiv 2605.26106's claims, as the paper states them
    "flops": "LoopMDM matches the baseline MDM with 2.3-3.3x fewer training FLOPs",
    "deep": "LoopMDM beats a deeper MDM of comparable per-step compute",
    "loops": "more inference loops help (S_max better than S = 1)",
    "extrapolate": "loops beyond the trained S_max help further",
    "adaptive": "adaptive loops keep S_max's quality with fewer loops",
}


def stats(values) -> dict:
  v = np.asarray(list(values), float)
  return dict(mean=float(v.mean()), min=float(v.min()), max=float(v.max()),
              std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n=int(len(v)),
              values=[float(x) for x in v])


def _floor(p: float, n: int) -> float:
  return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def _unpaired(a: dict, b: dict, higher_better: bool, floor: float) -> str:
  """Verdict for "a is better than b" from per-seed stats: the seed ranges apart by > floor."""
  if not higher_better:
    a, b = ({"min": -x["max"], "max": -x["min"]} for x in (a, b))
  if a["min"] - b["max"] > floor:
    return "reproduced"
  if b["min"] - a["max"] > floor:
    return "not reproduced"
  return "inconclusive"


def _paired(diffs, floor: float) -> str:
  """Verdict for "the per-seed differences are positive"."""
  if all(d > floor for d in diffs):
    return "reproduced"
  if all(d < -floor for d in diffs):
    return "not reproduced"
  return "inconclusive"


def _combine(*verdicts) -> str:
  if all(v == "reproduced" for v in verdicts):
    return "reproduced"
  if all(v == "not reproduced" for v in verdicts):
    return "not reproduced"
  return "inconclusive"


def _sweep(result: dict, spec: str) -> list[dict]:
  rows = sorted((r for r in result["loop_sweep"] if r["loops"] == spec), key=lambda r: r["seed"])
  if not rows:
    raise ValueError(f"the loop sweep has no S = {spec}")
  return rows


def summarize(result: dict) -> dict:
  """Per-model stats over seeds (final accuracy, bits, last-quarter change), the loop sweep's
  stats per setting, and the claims with their evidence and verdicts."""
  m, n = result["metric"], result.get("examples") or 1
  models = {}
  for name, run in result["models"].items():
    finals = [s["final"] for s in run["seeds"]]
    # How much the curve still moves: the change over the last quarter of training.
    late = []
    for s in run["seeds"]:
      c = s["curve"]
      k = max(len(c) * 3 // 4 - 1, 0)
      late.append(c[-1]["bits_per_token"] - c[k]["bits_per_token"])
    models[name] = dict(accuracy=stats(f[m] for f in finals),
                        bits_per_token=stats(f["bits_per_token"] for f in finals),
                        last_quarter_bits_change=stats(late))
  s_max = str(result["s_max"])
  loops = {}
  for spec in dict.fromkeys(r["loops"] for r in result["loop_sweep"]):
    rows = _sweep(result, spec)
    loops[spec] = dict(accuracy=stats(r[m] for r in rows),
                       executed_loops_mean=stats(r["executed_loops_mean"] for r in rows),
                       executed_flops_per_sample=stats(r["executed_flops_per_sample"]
                                                       for r in rows))
  claims = []
  lo, md, dp = (models.get(k) for k in ("loopmdm", "mdm", "deep_mdm"))
  if lo and md:
    acc_floor = _floor(md["accuracy"]["mean"], n)
    v = _combine(_unpaired(lo["accuracy"], md["accuracy"], True, acc_floor),
                 _unpaired(lo["bits_per_token"], md["bits_per_token"], False, 0.0))
    ratio = flops_to_reach(result, "loopmdm", "mdm")
    claims.append(dict(
        claim=PAPER["flops"], verdict=v,
        evidence=f"at mdm's total training FLOPs: {m} loopmdm {_ms(lo['accuracy'])} vs mdm "
                 f"{_ms(md['accuracy'])}; held-out bits/token {_ms(lo['bits_per_token'])} vs "
                 f"{_ms(md['bits_per_token'])}; " + (
                     f"LoopMDM reaches mdm's final {m} at {ratio:.2f}x fewer FLOPs"
                     if ratio else f"LoopMDM's mean curve never reaches mdm's final {m}")))
  if lo and dp:
    acc_floor = _floor(dp["accuracy"]["mean"], n)
    v = _combine(_unpaired(lo["accuracy"], dp["accuracy"], True, acc_floor),
                 _unpaired(lo["bits_per_token"], dp["bits_per_token"], False, 0.0))
    claims.append(dict(
        claim=PAPER["deep"], verdict=v,
        evidence=f"{m} loopmdm {_ms(lo['accuracy'])} vs deep_mdm {_ms(dp['accuracy'])}; "
                 f"bits/token {_ms(lo['bits_per_token'])} vs {_ms(dp['bits_per_token'])}"))
  if s_max in loops and "1" in loops:
    top, one = _sweep(result, s_max), _sweep(result, "1")
    floor = _floor(loops[s_max]["accuracy"]["mean"], n)
    diffs = [a[m] - b[m] for a, b in zip(top, one)]
    claims.append(dict(claim=PAPER["loops"], verdict=_paired(diffs, floor),
                       evidence=f"{m} at S = {s_max} minus S = 1, per seed: " + _list(diffs)))
    beyond = sorted((int(k) for k in loops if k.isdigit() and int(k) > int(s_max)))
    if beyond:
      far = str(beyond[-1] if 2 * int(s_max) not in beyond else 2 * int(s_max))
      diffs = [a[m] - b[m] for a, b in zip(_sweep(result, far), top)]
      claims.append(dict(claim=PAPER["extrapolate"], verdict=_paired(diffs, floor),
                         evidence=f"{m} at S = {far} minus S = {s_max}, per seed: "
                                  + _list(diffs)))
    adaptive = [k for k in loops if k.startswith("adaptive")]
    if adaptive:
      parts, verdicts = [], []
      for k in adaptive:
        rows = _sweep(result, k)
        diffs = [a[m] - b[m] for a, b in zip(rows, top)]
        saved = [1 - a["executed_flops_per_sample"] / b["executed_flops_per_sample"]
                 for a, b in zip(rows, top)]
        # Kept quality (no seed worse than S_max by more than the floor) and >= 10 % fewer
        # executed FLOPs on every seed.
        ok = all(d >= -floor for d in diffs) and all(s >= 0.1 for s in saved)
        bad = all(d < -floor for d in diffs) or all(s < 0.1 for s in saved)
        verdicts.append("reproduced" if ok else "not reproduced" if bad else "inconclusive")
        parts.append(f"{k}: {m} change {_list(diffs)}, executed FLOPs saved {_list(saved)}")
      v = ("reproduced" if "reproduced" in verdicts else
           "not reproduced" if all(x == "not reproduced" for x in verdicts) else "inconclusive")
      claims.append(dict(claim=PAPER["adaptive"], verdict=v, evidence="; ".join(parts)))
  return dict(models=models, loops=loops, claims=claims, accuracy_floor=(
      _floor(md["accuracy"]["mean"], n) if md else None))


def flops_to_reach(result: dict, model: str, target: str) -> float | None:
  """target's total training FLOPs over the FLOPs at which `model`'s seed-mean accuracy curve
  first reaches target's seed-mean final accuracy (linear between checkpoints); None if never."""
  m = result["metric"]
  goal = np.mean([s["final"][m] for s in result["models"][target]["seeds"]])
  x, y = mean_curve(result["models"][model], m)
  for i in range(len(x)):
    if y[i] >= goal:
      if i == 0:
        at = x[0]
      else:
        at = x[i - 1] + (goal - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1])
      return float(result["models"][target]["total_train_flops"] / at)
  return None


def mean_curve(run: dict, key: str, *, spread: bool = False):
  """(FLOPs, mean over seeds) at the checkpoints every seed has; with spread, also the
  per-seed minimum and maximum."""
  steps = sorted(set.intersection(*({p["step"] for p in s["curve"]} for s in run["seeds"])))
  by = [{p["step"]: p for p in s["curve"]} for s in run["seeds"]]
  x = np.array([by[0][k]["train_flops"] for k in steps])
  per = np.array([[b[k][key] for k in steps] for b in by])
  if spread:
    return x, per.mean(0), per.min(0), per.max(0)
  return x, per.mean(0)


def _ms(s: dict) -> str:
  return f"{s['mean']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"


def _list(xs) -> str:
  return ", ".join(f"{x:+.4f}" for x in xs)


def markdown_report(r: dict) -> str:
  m, s = r["metric"], r["summary"]
  d = r["data"]
  lines = [
      f"Preset {r['preset']}: task {r['task']} ({d.get('max_digits')}-digit '{d.get('ops')}'), "
      f"block [{r['block'][0]}, {r['block'][1]}) looped with S ~ U{{1..{r['s_max']}}}, "
      f"seeds {r['seeds']}, {r.get('examples')} held-out problems, metric {m}. "
      "Values: mean [min, max] over seeds.", "",
      "| model | layers | train loops | steps | params | train FLOPs | best lr | " + m +
      " | held-out bits/token | bits change, last quarter |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for name, run in r["models"].items():
    st = s["models"][name]
    lines.append(f"| {name} | {run['layers']} | {run['loops']} | {run['steps']} | "
                 f"{run['params']:,} | {run['total_train_flops']:.3g} | {run['best_lr']:g} | "
                 f"{_ms(st['accuracy'])} | {_ms(st['bits_per_token'])} | "
                 f"{st['last_quarter_bits_change']['mean']:+.4f} |")
  lines += ["", f"Learning-rate sweep (seed {r['seeds'][0]}, held-out bits/token at the end):", "",
            "| model | " + " | ".join(f"lr {x:g}" for x in r["lrs"]) + " |",
            "|---|" + "---|" * len(r["lrs"])]
  for name, run in r["models"].items():
    cells = [f"**{x['bits_per_token']:.4f}**" if x["lr"] == run["best_lr"]
             else f"{x['bits_per_token']:.4f}" for x in run["lr_sweep"]]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", f"Curves ({m} at S_max and held-out bits/token per checkpoint, mean over seeds):",
            "", "| model | training FLOPs -> " + m + " / bits |", "|---|---|"]
  for name, run in r["models"].items():
    x, acc = mean_curve(run, m)
    _, bits = mean_curve(run, "bits_per_token")
    lines.append(f"| {name} | " + ", ".join(f"{a:.3g} -> {b:.3f} / {c:.3f}"
                                             for a, b, c in zip(x, acc, bits)) + " |")
  lines += ["", "LoopMDM at inference (the best-lr model of each seed):", "",
            "| loops | executed loops per call | executed FLOPs/sample | " + m + " |",
            "|---|---|---|---|"]
  for spec, st in s["loops"].items():
    lines.append(f"| {spec} | {st['executed_loops_mean']['mean']:.2f} | "
                 f"{st['executed_flops_per_sample']['mean']:.3g} | {_ms(st['accuracy'])} |")
  if s.get("accuracy_floor") is not None:
    lines += ["", f"Claims (noise floor for {m}: one binomial standard error, "
                  f"{s['accuracy_floor']:.4f}):"]
  lines += ["", "| paper's claim | verdict | evidence |", "|---|---|---|"]
  for c in s["claims"]:
    lines.append(f"| {c['claim']} | {c['verdict']} | {c['evidence']} |")
  return "\n".join(lines) + "\n"


def pooled_accuracy_interval(values, examples: int) -> tuple[float, float, float]:
  """(mean, low, high): the mean of per-seed accuracies over `examples` problems each and the
  95 % Wilson interval of the pooled proportion (len(values) * examples problems)."""
  mean = float(np.mean(values))
  low, high = wilson_interval(mean, len(values) * int(examples))
  return mean, low, high


def plot_study(r: dict, plots_dir: str) -> list[str]:
  """The study's four figures in the one-column paper style of loopjax.evaluate.plots: accuracy
  and held-out bits vs training FLOPs (seed mean, band = range over seeds, accuracy bars = 95 %
  Wilson interval of the seeds' pooled problems), accuracy vs inference loops (adaptive rows at
  their executed loops per call) and the learning-rate sweep."""
  plt = plots.plt

  os.makedirs(plots_dir, exist_ok=True)
  m, n, seeds = r["metric"], int(r.get("examples") or 1), len(r["seeds"])
  wilson_note = f"bars: 95% Wilson interval over {seeds} x {n} problems"
  paths = []
  styles = {name: plots.series_style(k) for k, name in enumerate(r["models"])}
  # Models side by side along x, so that equal values stay visible.
  shift = {name: plots.dodge(k, len(r["models"]), 0.012) for k, name in enumerate(r["models"])}
  dodged = "; models offset slightly along x" if len(r["models"]) > 1 else ""
  for key, name in ((m, "study_quality_vs_train_flops"),
                    ("bits_per_token", "study_bits_vs_train_flops")):
    with plt.rc_context(plots.PAPER_STYLE):
      fig, ax = plt.subplots()
      scale = plots.flops_axis(ax, [x for run in r["models"].values()
                                    for x in mean_curve(run, key)[0]], "training FLOPs")
      for model, run in r["models"].items():
        color, marker, line = styles[model]
        x, y, lo, hi = mean_curve(run, key, spread=True)
        x = x / scale * shift[model]
        yerr = None
        if key == m:
          ci = np.array([wilson_interval(float(v), seeds * n) for v in y])
          yerr = [y - ci[:, 0], ci[:, 1] - y]
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        ax.errorbar(x, y, yerr=yerr, marker=marker, ls=line, color=color,
                    label=f"{model} (lr {run['best_lr']:g})")
      ax.set_ylabel(labels.metric_label(key))
      plots.plain_axis(ax.yaxis)
      ax.grid(which="major")
      note = f"line: mean of {seeds} seeds; band: range over seeds{dodged}"
      plots.legend_and_note(ax, note + ("\n" + wilson_note if key == m else ""))
      paths.append(plots.save_figure(fig, os.path.join(plots_dir, name + ".png")))

  loops = r["summary"]["loops"]
  by_spec = {spec: _sweep(r, spec) for spec in loops}
  with plt.rc_context(plots.PAPER_STYLE):
    fig, ax = plt.subplots()
    color, marker, line = styles.get("loopmdm", plots.series_style(0))
    fixed = sorted((int(k), v) for k, v in by_spec.items() if k.isdigit())
    xs = [k for k, _ in fixed]
    stats_ = [pooled_accuracy_interval([row[m] for row in v], n) for _, v in fixed]
    ys = np.array([t[0] for t in stats_])
    ax.errorbar(xs, ys, yerr=[ys - [t[1] for t in stats_], [t[2] for t in stats_] - ys],
                marker=marker, ls=line, color=color, label="LoopMDM, fixed S")
    for k, v in fixed:  # each seed's value, small and hollow behind the mean
      ax.plot([k] * len(v), [row[m] for row in v], "o", mfc="none", ms=2.5, mew=0.5,
              color=color, alpha=0.7)
    adaptive = [k for k in by_spec if not k.isdigit()]
    executed = [loops[k]["executed_loops_mean"]["mean"] for k in adaptive]
    spread = plots.spread_coinciding(executed, plots.POLICY_DODGE, xs)
    for j, (k, x) in enumerate(zip(adaptive, spread)):
      mean, low, high = pooled_accuracy_interval([row[m] for row in by_spec[k]], n)
      ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]],
                  fmt=plots.POLICY_MARKERS[j % len(plots.POLICY_MARKERS)], markersize=6,
                  color=plots.series_style(3 + j)[0],
                  label=labels.policy_label(k))
    ax.axvline(r["s_max"], ls=":", color="0.3", lw=1.0, label=f"S_max = {r['s_max']} (training)")
    for model, style in (("mdm", "--"), ("deep_mdm", "-.")):
      if model in r["summary"]["models"]:
        ax.axhline(r["summary"]["models"][model]["accuracy"]["mean"], ls=style, lw=0.8,
                   color="0.2", label=f"{model} (seed mean)")
    plots.loop_axis(ax, xs)
    ax.set_xlabel("inference loops S (adaptive: executed loops per call)")
    ax.set_ylabel(labels.metric_label(m))
    plots.plain_axis(ax.yaxis)
    ax.grid(which="major")
    note = f"{wilson_note}; dots: each seed"
    if adaptive:
      note += ("\nadaptive: executed " + ", ".join(f"{x:.2f}" for x in executed)
               + " loops/call" + (", drawn offset along x" if spread != executed else ""))
    plots.legend_and_note(ax, note)
    paths.append(plots.save_figure(fig, os.path.join(plots_dir, "study_quality_vs_loops.png")))

  with plt.rc_context(plots.PAPER_STYLE):
    fig, ax = plt.subplots()
    for model, run in r["models"].items():
      color, marker, line = styles[model]
      ax.plot([x["lr"] * shift[model] for x in run["lr_sweep"]],
              [x["bits_per_token"] for x in run["lr_sweep"]],
              marker=marker, ls=line, color=color, label=model)
    ax.set_xscale("log")
    lrs = sorted({x["lr"] for run in r["models"].values() for x in run["lr_sweep"]})
    ax.xaxis.set_major_locator(plots.FixedLocator(lrs))
    ax.xaxis.set_minor_locator(plots.NullLocator())
    ax.xaxis.set_major_formatter(plots.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("learning rate")
    ax.set_ylabel(labels.metric_label("bits_per_token"))
    plots.plain_axis(ax.yaxis)
    ax.grid(which="major")
    plots.legend_and_note(ax, f"seed {r['seeds'][0]}, end of training{dodged}")
    paths.append(plots.save_figure(fig, os.path.join(plots_dir, "study_lr_sweep.png")))
  return paths
