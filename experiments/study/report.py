"""The study's verdicts, its markdown report and its plots.

Verdict rule (every claim): each reported seed gives one difference d in held-out bits per
byte, signed so that d > 0 favours the claim, and a noise floor f = 2 x the standard error of
that difference over the held-out batches (both sides scored on the same rows with the same
Monte-Carlo draws, so the difference is paired; an MDM value at FLOPs between two checkpoints is
interpolated per batch). The claim is "reproduced" when d > f on every seed, "not reproduced"
when d < -f on every seed, and "inconclusive" otherwise. Adaptive loops must also run at most
90 % of S_max's executed loops on every seed to be reproduced (and are not reproduced when no
seed saves that much). The attention claim compares shares of attention, with a floor of 0.005.
"""

from __future__ import annotations

import math
import os

import numpy as np

from loopjax.evaluate.intervals import weighted_mean_se

from experiments.study import measure

PAPER = {
    "flops": "LoopMDM reaches the MDM's held-out NELBO with fewer training FLOPs (paper: 2.3-3.3x)",
    "deep": "LoopMDM beats the deeper MDM of equal per-step compute at equal FLOPs",
    "s1": "LoopMDM at S = 1 is worse than the MDM",
    "loops": "more inference loops help (S = S_max better than S = 1)",
    "extrapolate": "loops beyond S_max help further (S = 2 S_max better than S = S_max)",
    "adaptive": "adaptive loops keep S_max's quality with fewer executed loops",
    "attention": "attention among masked positions rises with S",
    "range": "training with a wide loop range beats a narrow one at equal FLOPs",
}
_NAMES = {"mdm": "MDM (same size)", "loopmdm": "LoopMDM S_max = {s_max}",
          "deep_mdm": "deeper MDM (compute-matched)",
          "loopmdm_s4": "LoopMDM S_max = {ablation_s_max} (ablation)"}


def name(r: dict, model: str) -> str:
  return _NAMES[model].format(s_max=r["s_max"], ablation_s_max=r["ablation_s_max"])


def verdict(diffs, floors, floor_min: float = 0.0) -> str:
  fs = [max(f, floor_min) for f in floors]
  if all(d > f for d, f in zip(diffs, fs)):
    return "reproduced"
  if all(d < -f for d, f in zip(diffs, fs)):
    return "not reproduced"
  return "inconclusive"


def _floor(a: dict, b: dict) -> float:
  """2 x the standard error of the paired difference a - b: per held-out batch, the same rows
  and the same draws, so what both share (the rows' own difficulty) cancels."""
  d = np.asarray(a["batches"], float) - np.asarray(b["batches"], float)
  if len(d) < 2:
    return 0.0
  _, se = weighted_mean_se(d, a["tokens"])
  return 2.0 * float(se)


def _at(curve: list, flops: float) -> dict:
  """Per-batch values of a curve at `flops`: linear in ln(FLOPs) between the checkpoints around
  it (the nearest end outside)."""
  xs = [math.log(q["flops"]) for q in curve]
  x = min(max(math.log(flops), xs[0]), xs[-1])
  i = max(1, min(int(np.searchsorted(xs, x)), len(xs) - 1))
  f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
  a, b = (np.asarray(curve[j]["batches"], float) for j in (i - 1, i))
  return dict(batches=((1 - f) * a + f * b).tolist(), tokens=curve[i]["tokens"])


def _fmt(xs, spec="+.4f") -> str:
  return ", ".join(format(x, spec) for x in xs)


def _sweep_row(seed: dict, spec: str) -> dict:
  return next(r for r in seed["loop_sweep"] if r["loops"] == spec)


def summarize(r: dict) -> dict:
  models = r["models"]
  out = dict(multiplier={}, gap={}, claims=[])
  mdm_seeds = {s["seed"]: s for s in models["mdm"]["seeds"]}
  out["mdm_end_slope"] = measure.spread(s["end_slope"] for s in models["mdm"]["seeds"])
  for model in ("loopmdm", "deep_mdm", "loopmdm_s4"):
    seeds = models[model]["seeds"]
    rows = []
    for i in range(len(seeds[0]["curve"])):
      ms = [s["flop_multiplier"][i] for s in seeds]
      gaps = [s["gap_at_equal_flops"][i]["bits_per_byte"] for s in seeds]
      rows.append(dict(budget=seeds[0]["curve"][i]["flops"],
                       multiplier=measure.multiplier_stats(ms),
                       gap=measure.spread(gaps) if None not in gaps else None,
                       bits_per_byte=measure.spread(s["curve"][i]["bits_per_byte"] for s in seeds)))
    out["multiplier"][model] = rows
    slopes = [measure.trend(s["flop_multiplier"]) for s in seeds]
    out.setdefault("trend", {})[model] = dict(
        per_seed=slopes, stats=measure.spread(x for x in slopes if x is not None)
        if any(x is not None for x in slopes) else None)
  claims = out["claims"]

  def final(model):
    return [s["curve"][-1] for s in models[model]["seeds"]]

  def mdm_at(seed, flops):
    c = mdm_seeds[seed]["curve"]
    v = measure.interpolate([(q["flops"], q["bits_per_byte"]) for q in c], flops)
    return v, _at(c, flops)

  lo = models["loopmdm"]["seeds"]
  at = [mdm_at(s["seed"], s["curve"][-1]["flops"]) for s in lo]
  d = [m - s["curve"][-1]["bits_per_byte"] for (m, _), s in zip(at, lo)]
  f = [_floor(s["curve"][-1], m) for (_, m), s in zip(at, lo)]
  ms = [s["flop_multiplier"][-1] for s in lo]
  claims.append(dict(key="flops", claim=PAPER["flops"], verdict=verdict(d, f), evidence=(
      f"at the largest budget, MDM minus LoopMDM bits/byte per seed: {_fmt(d)} (floors "
      f"{_fmt(f, '.4f')}); M per seed: " + ", ".join(
          f"{'' if m['bound'] == '=' else m['bound']}{m['value']:.2f}" for m in ms))))
  dp = final("deep_mdm")
  d = [a["bits_per_byte"] - b["bits_per_byte"] for a, b in zip(dp, final("loopmdm"))]
  f = [_floor(a, b) for a, b in zip(dp, final("loopmdm"))]
  claims.append(dict(key="deep", claim=PAPER["deep"], verdict=verdict(d, f),
                     evidence=f"deeper MDM minus LoopMDM, per seed: {_fmt(d)}"))
  s4 = final("loopmdm_s4")
  d = [a["bits_per_byte"] - b["bits_per_byte"] for a, b in zip(s4, final("loopmdm"))]
  f = [_floor(a, b) for a, b in zip(s4, final("loopmdm"))]
  claims.append(dict(key="range", claim=PAPER["range"], verdict=verdict(d, f),
                     evidence=f"S_max = {r['ablation_s_max']} minus S_max = {r['s_max']}, "
                              f"per seed: "
                              f"{_fmt(d)}"))
  s_max = str(r["s_max"])
  if "loop_sweep" in lo[0]:
    specs = [x["loops"] for x in lo[0]["loop_sweep"]]
    one = [_sweep_row(s, "1") for s in lo]
    d = [m - x["bits_per_byte"] for (m, _), x in zip(at, one)]
    f = [_floor(x, m) for (_, m), x in zip(at, one)]
    worse = [-x for x in d]
    claims.append(dict(key="s1", claim=PAPER["s1"], verdict=verdict(worse, f),
                       evidence=f"LoopMDM at S = 1 minus the MDM at equal FLOPs: {_fmt(worse)}"))
    if s_max in specs:
      top = [_sweep_row(s, s_max) for s in lo]
      d = [a["bits_per_byte"] - b["bits_per_byte"] for a, b in zip(one, top)]
      f = [_floor(a, b) for a, b in zip(one, top)]
      claims.append(dict(key="loops", claim=PAPER["loops"], verdict=verdict(d, f),
                         evidence=f"S = 1 minus S = {s_max}, per seed: {_fmt(d)}"))
      beyond = [k for k in specs if k.isdigit() and int(k) > int(s_max)]
      if beyond:
        far = beyond[-1]
        fr = [_sweep_row(s, far) for s in lo]
        d = [a["bits_per_byte"] - b["bits_per_byte"] for a, b in zip(top, fr)]
        f = [_floor(a, b) for a, b in zip(top, fr)]
        claims.append(dict(key="extrapolate", claim=PAPER["extrapolate"].replace(
            "2 S_max", far), verdict=verdict(d, f),
            evidence=f"S = {s_max} minus S = {far}, per seed: {_fmt(d)}"))
      parts, vs = [], []
      for k in (k for k in specs if k.startswith("adaptive")):
        ad = [_sweep_row(s, k) for s in lo]
        d = [b["bits_per_byte"] - a["bits_per_byte"] for a, b in zip(ad, top)]
        f = [_floor(a, b) for a, b in zip(ad, top)]
        frac = [a["executed_loops"] / b["executed_loops"] for a, b in zip(ad, top)]
        kept = all(x > -y for x, y in zip(d, f))
        v = ("reproduced" if kept and all(x <= 0.9 for x in frac) else
             "not reproduced" if all(x < -y for x, y in zip(d, f)) or all(x > 0.9 for x in frac)
             else "inconclusive")
        vs.append(v)
        parts.append(f"{k}: quality change {_fmt(d)}, executed loops {_fmt(frac, '.2f')} of "
                     "S_max's")
      if vs:
        v = ("reproduced" if "reproduced" in vs else
             "not reproduced" if all(x == "not reproduced" for x in vs) else "inconclusive")
        claims.append(dict(key="adaptive", claim=PAPER["adaptive"], verdict=v,
                           evidence="; ".join(parts)))
  if "attention" in lo[0]:
    by = [{a["loops"]: a["final_iteration_share"] for a in s["attention"]} for s in lo]
    top_s = int(s_max) if int(s_max) in by[0] else max(by[0])
    d = [b[top_s] - b[1] for b in by]
    claims.append(dict(key="attention", claim=PAPER["attention"],
                       verdict=verdict(d, [0.0] * len(d), 0.005),
                       evidence=f"share at S = {top_s} minus S = 1, per seed: {_fmt(d)}"))
  return out


def _ms(s: dict, spec=".4f") -> str:
  return f"{format(s['mean'], spec)} [{format(s['min'], spec)}, {format(s['max'], spec)}]"


def _m(st: dict) -> str:
  cens = f" ({st['censored']} censored: {', '.join(b for b in st['bounds'] if b != '=')})" \
      if st["censored"] else ""
  return f"{st['geomean']:.2f} [{st['min']:.2f}, {st['max']:.2f}]{cens}"


def markdown(r: dict) -> str:
  s, models = r["summary"], r["models"]
  h = r["heldout"]
  lines = [
      "## Setup", "",
      f"Preset `{r['preset']}`. Metric: {r['metric']}, on one fixed held-out set of {h['rows']} "
      f"rows x {h['seq_len']} bytes in {h['batches']} batches "
      f"({r['corpus']['documents']['heldout']} held-out documents "
      f"chosen by a hash of their text), {h['time_points']} time points on a fixed grid and "
      f"one fixed Monte-Carlo seed for every model and seed. LoopMDM loops block "
      f"[{r['loop_block'][0]}, {r['loop_block'][1]}) with S ~ U{{1..{r['s_max']}}}. Learning "
      f"rates chosen on seed {r['lr_seed']} (not reported); reported seeds {r['seeds']}. "
      "Values: mean [min, max] over seeds; EMA weights (warm-up as MDLM) unless marked raw.", "",
      "## Models", "",
      "| model | layers | training loops | params | FLOPs per step | steps | chosen lr | "
      "final bits/byte (EMA) | final bits/byte (raw) | SE over held-out batches |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for model, m in models.items():
    fin = measure.spread(x["curve"][-1]["bits_per_byte"] for x in m["seeds"])
    raw = measure.spread(x["final_raw"]["bits_per_byte"] for x in m["seeds"])
    se = max(x["curve"][-1]["se"] for x in m["seeds"])
    lines.append(f"| {name(r, model)} | {m['layers']} | {m['loops']} | {m['params']:,} | "
                 f"{m['flops_per_step']:.3g} | {m['steps']} | {m['best_lr']:g} | {_ms(fin)} | "
                 f"{_ms(raw)} | {se:.4f} |")
  lines += ["", "## Learning-rate choice (held-out bits/byte at the budget)", "",
            "| model | " + " | ".join(f"lr {x:g}" for x in r["lrs"]) + " |",
            "|---|" + "---|" * len(r["lrs"])]
  for model, m in models.items():
    lines.append(f"| {name(r, model)} | " + " | ".join(
        "diverged" if x["diverged"] else f"{x['bits_per_byte']:.4f}" for x in m["lr_sweep"]) + " |")
  slope = s["mdm_end_slope"]
  lines += ["", "## FLOP multiplier against training budget", "",
            "M = FLOPs the MDM needs to reach the model's held-out NELBO / the model's FLOPs "
            "(per seed against the same seed's MDM; geometric mean [min, max]; > x / < x: "
            "censored at the end of the MDM's curve). Gap: model minus MDM at equal FLOPs, "
            f"bits/byte. The MDM's end slope: {_ms(slope)} bits/byte per e-fold of FLOPs.", "",
            "| model | budget (FLOPs) | bits/byte | M | gap at equal FLOPs |",
            "|---|---|---|---|---|"]
  for model, rows in s["multiplier"].items():
    for row in rows:
      gap = _ms(row["gap"], "+.4f") if row["gap"] else "outside the MDM's curve"
      lines.append(f"| {name(r, model)} | {row['budget']:.3g} | {_ms(row['bits_per_byte'])} | "
                   f"{_m(row['multiplier'])} | {gap} |")
  lines += ["", "Trend of M with budget (d ln M / d ln budget per seed, over the uncensored "
            "budgets; > 0: the model gains on the MDM as the budget grows):", ""]
  for model, t in s["trend"].items():
    per = ", ".join("n/a" if x is None else f"{x:+.3f}" for x in t["per_seed"])
    lines.append(f"- {name(r, model)}: {per}" + (f"; mean {t['stats']['mean']:+.3f}"
                                                 if t["stats"] else ""))
  lines += ["", "## MDM curve", "", "| training FLOPs | bits/byte |", "|---|---|"]
  mc = models["mdm"]["seeds"]
  for i, q in enumerate(mc[0]["curve"]):
    st = measure.spread(x["curve"][i]["bits_per_byte"] for x in mc)
    lines.append(f"| {q['flops']:.3g} | {_ms(st)} |")
  lo = models["loopmdm"]["seeds"]
  if "loop_sweep" in lo[0]:
    lines += ["", "## LoopMDM at inference", "",
              "| loops | bits/byte | loops per sequence | executed loops per call | executed "
              "forward FLOPs per sequence | scoring wall time (s) |", "|---|---|---|---|---|---|"]
    for i, row in enumerate(lo[0]["loop_sweep"]):
      rows = [x["loop_sweep"][i] for x in lo]
      st = lambda k: measure.spread(x[k] for x in rows)
      lines.append(f"| {row['loops']} | {_ms(st('bits_per_byte'))} | "
                   f"{st('loops_per_sequence')['mean']:.2f} | {st('executed_loops')['mean']:.2f} | "
                   f"{st('executed_flops_per_seq')['mean']:.3g} | {st('seconds')['mean']:.2f} |")
  if "attention" in lo[0]:
    lines += ["", "## Masked-to-masked attention (last iteration of the looped block)", "",
              "| loops | share | chance |", "|---|---|---|"]
    for i, row in enumerate(lo[0]["attention"]):
      rows = [x["attention"][i] for x in lo]
      st = measure.spread(x["final_iteration_share"] for x in rows)
      lines.append(f"| {row['loops']} | {_ms(st, '.3f')} "
                   f"| {np.mean([x['chance'] for x in rows]):.3f} |")
  lines += ["", "## The paper's claims", "",
            "Rule: " + __doc__.split("\n\n")[1].replace("\n", " "), "",
            "| claim | verdict | evidence |", "|---|---|---|"]
  for c in s["claims"]:
    lines.append(f"| {c['claim']} | {c['verdict']} | {c['evidence']} |")
  return "\n".join(lines) + "\n"


def plots(r: dict, out_dir: str) -> list[str]:
  """M against budget (geometric mean, bars = range over seeds) and bits/byte against FLOPs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import LogLocator, NullFormatter
  os.makedirs(out_dir, exist_ok=True)
  # One colour per model in both figures, in the order of r["models"].
  colour = {m: f"C{k}" for k, m in enumerate(r["models"])}

  def log_x(ax):  # decades labelled, minor ticks unlabelled (their labels overlap)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_minor_formatter(NullFormatter())

  paths = []
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for k, (model, rows) in enumerate(r["summary"]["multiplier"].items()):
    x = np.array([row["budget"] for row in rows]) * (1 + 0.03 * k)
    g = np.array([row["multiplier"]["geomean"] for row in rows])
    lo = np.array([row["multiplier"]["min"] for row in rows])
    hi = np.array([row["multiplier"]["max"] for row in rows])
    ax.errorbar(x, g, yerr=[np.maximum(g - lo, 0), np.maximum(hi - g, 0)], marker="o",
                capsize=3, label=name(r, model), color=colour[model])
  ax.axhline(1.0, color="0.3", ls=":", lw=1)
  log_x(ax)
  ax.set_yscale("log")
  ax.set_xlabel("training budget (FLOPs)")
  ax.set_ylabel("FLOP multiplier M vs the MDM")
  ax.legend(fontsize=7)
  ax.set_title(f"bars: range over {len(r['seeds'])} seeds; censored values at their bound",
               fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "study_multiplier_vs_budget.png"))
  fig.savefig(paths[-1], dpi=150)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for model, m in r["models"].items():
    x = np.array([q["flops"] for q in m["seeds"][0]["curve"]])
    ys = np.array([[q["bits_per_byte"] for q in s["curve"]] for s in m["seeds"]])
    ax.plot(x, ys.mean(0), marker="o", label=name(r, model), color=colour[model])
    ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.2, color=colour[model])
  log_x(ax)
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("held-out NELBO (bits/byte)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "study_bits_vs_flops.png"))
  fig.savefig(paths[-1], dpi=150)
  plt.close(fig)
  return paths
