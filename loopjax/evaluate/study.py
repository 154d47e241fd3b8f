"""The small-scale LoopMDM study, rerunnable with one command on a laptop-class CPU.

  loopjax study --workdir DIR [--task sudoku|arithmetic] [--scale small|tiny]

Trains four models of the paper's comparison on a built-in task (loopjax/train/variants.py):

  mdm          same-size MDM, `baseline_steps` steps          (MDM at matched total FLOPs)
  loopmdm      LoopMDM, steps FLOP-matched to mdm's total
  deep_mdm     plain MDM at LoopMDM's per-step compute, LoopMDM's steps
  mdm_matched  same-size MDM, LoopMDM's steps                  (same steps, fewer FLOPs)

then measures task accuracy on held-out puzzles at every checkpoint (quality vs training FLOPs),
LoopMDM at inference S = 1 .. 2 S_max, and adaptive loops against fixed S_max. Writes
DIR/study.json, DIR/study.md (the tables) and DIR/plots/study_*.png. Re-running resumes: trained
runs are not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from loopjax import flops
from loopjax.evaluate.tasks import heldout_batches, primary_metric, task_accuracy
from loopjax.model import LoopDistribution
from loopjax.train.config import model_config
from loopjax.train.loop import train
from loopjax.train.config_load import read_config
from loopjax.train.variants import resolve_variant
from loopjax.weights import load_run

# scale -> model/train overrides, baseline steps, eval examples, adaptive taus, inference S sweep
SCALES = {
    "small": dict(model=dict(width=64, num_layers=4, num_heads=4, cond_dim=32),
                  train=dict(batch_size=64, lr=3e-3, warmup_steps=100, ema_decay=0.99),
                  baseline_steps=1600, examples=256, taus=(0.1, 0.03, 0.01),
                  sweep=(1, 2, 3, 4, 5, 6, 12, 24)),
    "tiny": dict(model=dict(width=32, num_layers=3, num_heads=2, cond_dim=16),
                 train=dict(batch_size=8, lr=3e-3, warmup_steps=2, ema_decay=0.9),
                 baseline_steps=8, examples=8, taus=(0.1,), sweep=(1, 6, 12)),
}
TASKS = {"sudoku": dict(block=(1, 2), s_max=6), "arithmetic": dict(block=(1, 2), s_max=6)}
RUNS = ("mdm", "loopmdm", "deep_mdm", "mdm_matched")


def study_config(task: str, scale: str, variant: str):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c, _ = read_config(os.path.join(root, "experiments", f"{task}.py") + f":{variant}")
  s = SCALES[scale]
  c.model.update(s["model"])
  c.train.update(s["train"])
  c.variant.update(baseline_steps=s["baseline_steps"], **TASKS[task])
  resolve_variant(c)
  every = max(c.train.steps // 4, 1)
  c.train.update(checkpoint_every=every, keep_checkpoints=100, log_every=max(every // 4, 1),
                 eval_every=c.train.steps, eval_batches=1, async_checkpoints=False)
  c.eval.examples = s["examples"]
  return c


def run_study(workdir: str, *, task: str = "sudoku", scale: str = "small", log=print) -> dict:
  if task not in TASKS or scale not in SCALES:
    raise ValueError(f"task must be one of {list(TASKS)} and scale one of {list(SCALES)}")
  t0 = time.time()
  metric = primary_metric(task)
  result = {"task": task, "scale": scale, "metric": metric, "runs": {}}
  batches = None
  for variant in RUNS:
    config = study_config(task, scale, variant)
    run_dir = os.path.join(workdir, "runs", variant)
    cfg = model_config(config)
    dist = LoopDistribution.parse(config.loops.train)
    per_step = flops.expected_train_flops_per_step(cfg, config.data.seq_len,
                                                   config.train.batch_size, dist)
    log(f"[study] {variant}: {cfg.num_layers} layers, loops {config.loops.train}, "
        f"{config.train.steps} steps, {per_step:.3g} FLOPs/step")
    ts = time.time()
    train(config, run_dir)
    batches = batches or heldout_batches(config.data, SCALES[scale]["examples"],
                                         seed=int(config.train.seed) + 1)
    s_max = cfg.max_loops if cfg.looped else 1
    curve = []
    for step in _steps(run_dir):
      _, model, params, _ = load_run(run_dir, step=step)
      acc = task_accuracy(model, params, batches, source=task, loops=s_max)
      curve.append(dict(step=step, train_flops=step * per_step, **_pick(acc, metric)))
    result["runs"][variant] = dict(
        layers=cfg.num_layers, loops=config.loops.train, steps=int(config.train.steps),
        params=flops.param_counts(cfg)["total"], flops_per_step=per_step,
        total_train_flops=per_step * config.train.steps, curve=curve, final=curve[-1],
        train_seconds=time.time() - ts)
    log(f"[study] {variant}: {metric} {curve[-1][metric]:.4f} "
        f"(cells {curve[-1].get('cell_accuracy', float('nan')):.4f})")
  # LoopMDM at inference: fixed S, more loops than trained, adaptive.
  _, model, params, _ = load_run(os.path.join(workdir, "runs", "loopmdm"))
  sweep = []
  for spec in [*SCALES[scale]["sweep"], *(f"adaptive:{tau}" for tau in SCALES[scale]["taus"])]:
    acc = task_accuracy(model, params, batches, source=task, loops=spec)
    sweep.append(dict(loops=str(spec), loops_mean=acc["loops_mean"],
                      flops_per_sample=acc["flops_per_sample"], **_pick(acc, metric)))
    log(f"[study] loopmdm S={spec}: {metric} {acc[metric]:.4f}, loops {acc['loops_mean']:.2f}")
  result["loop_sweep"] = sweep
  result["seconds"] = time.time() - t0
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = markdown_tables(result)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(table)
  result["plots"] = plot_study(result, os.path.join(workdir, "plots"))
  log(table)
  return result


def _steps(run_dir: str) -> list[int]:
  d = os.path.join(run_dir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def _pick(acc: dict, metric: str) -> dict:
  keys = {metric, "cell_accuracy", "board_accuracy", "exact_board_accuracy", "exact_match"}
  return {k: acc[k] for k in keys if k in acc}


def markdown_tables(r: dict) -> str:
  m = r["metric"]
  lines = [f"Task {r['task']}, scale {r['scale']}, metric {m} (held-out).", "",
           "| run | layers | train loops | steps | params | train FLOPs | " + m + " | cells |",
           "|---|---|---|---|---|---|---|---|"]
  for name, run in r["runs"].items():
    f = run["final"]
    lines.append(f"| {name} | {run['layers']} | {run['loops']} | {run['steps']} | "
                 f"{run['params']:,} | {run['total_train_flops']:.3g} | {f[m]:.4f} | "
                 f"{f.get('cell_accuracy', float('nan')):.4f} |")
  lines += ["", "LoopMDM at inference:", "",
            "| loops | loops per sequence (mean) | executed loops per call | executed inference "
            "FLOPs/sample | " + m + " | cells |",
            "|---|---|---|---|---|---|"]
  for row in r["loop_sweep"]:
    executed = row.get("executed_flops_per_sample", row["flops_per_sample"])
    lines.append(f"| {row['loops']} | {row['loops_mean']:.2f} | "
                 f"{row.get('executed_loops_mean', row['loops_mean']):.2f} | {executed:.3g} | "
                 f"{row[m]:.4f} | {row.get('cell_accuracy', float('nan')):.4f} |")
  return "\n".join(lines) + "\n"


def plot_study(r: dict, plots_dir: str) -> list[str]:
  import matplotlib  # lazy: a slow import that only plotting needs
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(plots_dir, exist_ok=True)
  key = "cell_accuracy" if r["task"] == "sudoku" else r["metric"]
  paths = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, run in r["runs"].items():
    ax.plot([p["train_flops"] for p in run["curve"]], [p[key] for p in run["curve"]], "o-",
            label=name)
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel(key)
  ax.set_title("quality vs training compute")
  ax.grid(alpha=0.3)
  ax.legend()
  paths.append(_save(fig, plots_dir, "study_quality_vs_train_flops.png"))

  fig, ax = plt.subplots(figsize=(6, 4))
  fixed = [x for x in r["loop_sweep"] if x["loops"].isdigit()]
  ax.plot([int(x["loops"]) for x in fixed], [x[key] for x in fixed], "o-", label="LoopMDM")
  for x in r["loop_sweep"]:
    if not x["loops"].isdigit():
      ax.plot(x["loops_mean"], x[key], "*", markersize=12, label=f"{x['loops']}")
  for name in ("mdm", "deep_mdm"):
    if name in r["runs"]:
      ax.axhline(r["runs"][name]["final"][key], ls="--", lw=1, color="gray" if name == "mdm"
                 else "black", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("inference loops S (executed mean for adaptive)")
  ax.set_ylabel(key)
  ax.set_title("LoopMDM: quality vs inference loops")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  paths.append(_save(fig, plots_dir, "study_quality_vs_loops.png"))
  return paths


def _save(fig, d, name):
  import matplotlib.pyplot as plt  # lazy: see plot_study
  path = os.path.join(d, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def study_main(argv) -> int:
  p = argparse.ArgumentParser(prog="loopjax study", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--task", default="sudoku", choices=sorted(TASKS))
  p.add_argument("--scale", default="small", choices=sorted(SCALES))
  args = p.parse_args(argv)
  run_study(args.workdir, task=args.task, scale=args.scale)
  return 0


if __name__ == "__main__":
  sys.exit(study_main(sys.argv[1:]))
