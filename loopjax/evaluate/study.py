"""The small-scale LoopMDM study: one command that can tell whether looping helps at this scale.

  loopjax study --workdir DIR [--preset cpu|gpu|tiny]

Compares three models of the paper's comparison (loopjax/config/variants.py) on one built-in task:

  mdm       a 12-layer MDM, `steps` steps                            (the FLOP budget)
  loopmdm   the same 12 layers with a two-layer block looped, S ~ U{1..S_max}; steps FLOP-matched
            to mdm's total (the paper's rule, F_base = every forward matmul)
  deep_mdm  a plain MDM with LoopMDM's per-step compute (more layers), LoopMDM's steps

For each model it sweeps the learning rate (seed 0; the best is picked on held-out bits per
token at the end of training), trains the other seeds at that rate, scores every checkpoint on
held-out problems (task accuracy vs training FLOPs; held-out bits per token come from the
training's own evaluations), and runs each LoopMDM at inference S = 1 .. beyond S_max and with
adaptive loops. `loopjax.evaluate.study_report` turns that into tables (mean and range over
seeds), the paper's claims with verdicts, and plots with error bars: DIR/study.json,
DIR/study.md, DIR/plots/study_*.png. Re-running resumes: finished runs are not retrained.

The learning-rate schedule is MDLM's (warm-up, then constant), so a run's checkpoint at step k
is the run that trains for k steps: the curves double as the same-steps comparison.
"""

from __future__ import annotations

import json
import os
import time

from loopjax import flops
from loopjax.data.arithmetic import required_seq_len
from loopjax.evaluate.study_report import markdown_report, plot_study, summarize
from loopjax.evaluate.tasks import heldout_batches, primary_metric, task_accuracy
from loopjax.config.run import from_config
from loopjax.config.load import read_config
from loopjax.train.loop import NonFiniteLossError, train
from loopjax.config.variants import resolve_variant
from loopjax.io.load import load_run

# Multi-digit addition: the carry into a digit depends on every lower digit, a chain as long as
# the operands, so how many serial steps the network can compute plausibly limits it (unlike
# Sudoku at this size, which no model here learns beyond single cells). Rows are short
# (2 * digits + 2 + answer field), which keeps a 12-layer model affordable on a CPU.
_ARITH = dict(source="arithmetic", ops="+")
PRESETS = {
    # ~40-50 min on 2 CPU cores.
    "cpu": dict(data=dict(_ARITH, max_digits=3),
                model=dict(width=32, num_layers=12, num_heads=2, cond_dim=16),
                train=dict(batch_size=64, warmup_steps=100, ema_decay=0.99),
                block=(3, 5), s_max=4, steps=3000, lrs=(2e-3, 4e-3, 8e-3), seeds=(0, 1),
                checkpoints=8, eval_batches=4, examples=512,
                sweep=(1, 2, 3, 4, 6, 8, 16), taus=(0.1, 0.03, 0.01)),
    # The same comparison at ~100x the training compute (4x width, 4x batch, 1.5x steps, longer
    # operands), sized for ~10 min on one H100/H200.
    "gpu": dict(data=dict(_ARITH, max_digits=6),
                model=dict(width=128, num_layers=12, num_heads=4, cond_dim=64),
                train=dict(batch_size=256, warmup_steps=200, ema_decay=0.995),
                block=(3, 5), s_max=4, steps=3000, lrs=(5e-4, 1e-3, 2e-3), seeds=(0, 1, 2),
                checkpoints=8, eval_batches=8, examples=2048,
                sweep=(1, 2, 3, 4, 6, 8, 16), taus=(0.1, 0.03, 0.01)),
    # The pipeline end to end in seconds (tests).
    "tiny": dict(data=dict(_ARITH, max_digits=2),
                 model=dict(width=16, num_layers=3, num_heads=2, cond_dim=8),
                 train=dict(batch_size=8, warmup_steps=2, ema_decay=0.9),
                 block=(1, 3), s_max=2, steps=4, lrs=(1e-3, 3e-3), seeds=(0, 1),
                 checkpoints=2, eval_batches=1, examples=8, sweep=(1, 2, 4), taus=(0.1,)),
}
MODELS = ("mdm", "loopmdm", "deep_mdm")


def study_config(preset: str, variant: str, *, lr: float, seed: int):
  """The experiment config of one study run (variant, learning rate, seed)."""
  p = PRESETS[preset]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  task = p["data"]["source"]
  c, _ = read_config(os.path.join(root, "experiments", f"{task}.py") + f":{variant}")
  c.data.update(p["data"])
  length = required_seq_len(c.data.max_digits, c.data.ops)
  c.data.seq_len = length
  c.model.update(p["model"], max_length=length)
  c.train.update(p["train"], lr=lr, seed=seed, lr_schedule="constant")
  c.variant.update(baseline_steps=p["steps"], block=p["block"], s_max=p["s_max"],
                   flop_convention="all_forward")
  resolve_variant(c)
  # Evaluations ride on log steps; checkpoints at each evaluation give the curves.
  log_every = max(c.train.steps // (2 * p["checkpoints"]), 1)
  c.train.update(log_every=log_every, eval_every=2 * log_every, checkpoint_every=2 * log_every,
                 keep_checkpoints=p["checkpoints"] + 2, eval_batches=p["eval_batches"],
                 async_checkpoints=False)
  c.eval.examples = p["examples"]
  return c


def run_dir(workdir: str, variant: str, lr: float, seed: int) -> str:
  return os.path.join(workdir, "runs", variant, f"lr{lr:g}_seed{seed}")


def run_study(workdir: str, *, preset: str = "cpu", log=print) -> dict:
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
  p = PRESETS[preset]
  t0 = time.time()
  task = p["data"]["source"]
  metric = primary_metric(task)
  result = {"preset": preset, "task": task, "data": p["data"], "model": p["model"],
            "metric": metric, "block": list(p["block"]), "s_max": p["s_max"],
            "lrs": list(p["lrs"]), "seeds": list(p["seeds"]), "models": {}}
  n_runs = len(MODELS) * (len(p["lrs"]) + len(p["seeds"]) - 1)
  done = 0

  def trained(variant, lr, seed) -> dict:
    nonlocal done
    config = study_config(preset, variant, lr=lr, seed=seed)
    d = run_dir(workdir, variant, lr, seed)
    done += 1
    log(f"[study] run {done}/{n_runs}: {variant} lr {lr:g} seed {seed} "
        f"({config.train.steps} steps; {(time.time() - t0) / 60:.1f} min so far)")
    failed = os.path.join(d, "study_diverged.txt")
    if not _finished(d, config.train.steps) and not os.path.exists(failed):
      try:
        train(config, d)
      except NonFiniteLossError as e:  # a learning rate too high for this model: a result
        os.makedirs(d, exist_ok=True)
        with open(failed, "w") as f:
          f.write(str(e))
    if os.path.exists(failed):
      log(f"[study] {variant} lr {lr:g} seed {seed} diverged: {open(failed).read()}")
      return dict(dir=d, config=config, evals=[], diverged=True)
    return dict(dir=d, config=config, evals=_eval_rows(d))

  batches = None
  for variant in MODELS:
    sweep = {lr: trained(variant, lr, p["seeds"][0]) for lr in p["lrs"]}
    final = {lr: r["evals"][-1]["eval_bits_per_token"] if r["evals"] else float("inf")
             for lr, r in sweep.items()}
    if all(r.get("diverged") for r in sweep.values()):
      raise RuntimeError(f"study: {variant} diverged at every learning rate {p['lrs']}")
    best = min(final, key=final.get)
    log(f"[study] {variant}: held-out bits/token by lr {final}; best lr {best:g}")
    runs = [sweep[best]] + [trained(variant, best, s) for s in p["seeds"][1:]]
    if any(r.get("diverged") for r in runs):
      raise RuntimeError(f"study: {variant} at lr {best:g} diverged on a seed other than "
                         f"{p['seeds'][0]}; see {runs[-1]['dir']}")
    config = runs[0]["config"]
    run = from_config(config)
    cfg = run.model
    per_step = flops.expected_train_flops_per_step(
        cfg, config.data.seq_len, config.train.batch_size, run.loops)
    batches = batches or heldout_batches(config.data, p["examples"], seed=10_000)
    s_max = cfg.max_loops if cfg.looped else 1
    seeds = []
    for seed, r in zip(p["seeds"], runs):
      curve = _curve(r, batches, task, metric, s_max, per_step)
      seeds.append(dict(seed=seed, curve=curve, final=curve[-1]))
      log(f"[study] {variant} seed {seed}: {metric} {curve[-1][metric]:.4f}, held-out bits/token "
          f"{curve[-1]['bits_per_token']:.4f}")
    result["models"][variant] = dict(
        layers=cfg.num_layers, loops=config.loops.train, steps=int(config.train.steps),
        params=flops.param_counts(cfg)["total"], flops_per_step=per_step,
        total_train_flops=per_step * config.train.steps, best_lr=best,
        lr_sweep=[dict(lr=lr, bits_per_token=final[lr]) for lr in p["lrs"]], seeds=seeds)

  # LoopMDM at inference: fixed S (beyond S_max too) and adaptive, per seed.
  loop_sweep = []
  best = result["models"]["loopmdm"]["best_lr"]
  specs = [*map(str, p["sweep"]), *(f"adaptive:{tau}" for tau in p["taus"])]
  for seed in p["seeds"]:
    for row in _loop_sweep(run_dir(workdir, "loopmdm", best, seed), batches, task, metric, specs):
      loop_sweep.append(dict(seed=seed, **row))
      log(f"[study] loopmdm seed {seed} S={row['loops']}: {metric} {row[metric]:.4f}, executed "
          f"loops {row['executed_loops_mean']:.2f}")
  result["loop_sweep"] = loop_sweep
  result["examples"] = sum(len(b["tokens"]) for b in batches)
  result["seconds"] = time.time() - t0
  result["summary"] = summarize(result)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(result, f, indent=2)
  report = markdown_report(result)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(report)
  result["plots"] = plot_study(result, os.path.join(workdir, "plots"))
  log(report)
  log(f"[study] done in {result['seconds'] / 60:.1f} min")
  return result


def _finished(d: str, steps: int) -> bool:
  return os.path.isdir(os.path.join(d, "checkpoints", str(steps)))


def _eval_rows(d: str) -> list[dict]:
  """The held-out evaluations of a run's metrics.jsonl, one per step (the newest row wins:
  a resumed run rewrites the rows after its checkpoint)."""
  rows = {}
  with open(os.path.join(d, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "eval_bits_per_token" in row:
        rows[row["step"]] = row
  return [rows[s] for s in sorted(rows)]


def _steps(d: str) -> list[int]:
  c = os.path.join(d, "checkpoints")
  return sorted(int(s) for s in os.listdir(c) if s.isdigit())


def _cached(path: str, key: dict, compute):
  """compute() once per key: a re-run of the study re-reads what was scored already."""
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("key") == key:
      return saved["value"]
  value = compute()
  with open(path, "w") as f:
    json.dump(dict(key=key, value=value), f, indent=1)
  return value


def _curve(run: dict, batches, task: str, metric: str, s_max: int, per_step: float) -> list:
  """Per checkpoint: training FLOPs spent, task accuracy at S_max (EMA weights) and held-out
  bits per token."""
  bits = {r["step"]: r["eval_bits_per_token"] for r in run["evals"]}

  def score():
    curve = []
    for step in _steps(run["dir"]):
      if step not in bits:
        continue
      _, model, params, _ = load_run(run["dir"], step=step)
      acc = task_accuracy(model, params, batches, source=task, loops=s_max)
      curve.append(dict(step=step, train_flops=step * per_step, bits_per_token=bits[step],
                        **{metric: acc[metric]}))
    return curve

  key = dict(metric=metric, examples=sum(len(b["tokens"]) for b in batches), s_max=s_max,
             steps=sorted(bits))
  return _cached(os.path.join(run["dir"], "study_curve.json"), key, score)


def _loop_sweep(d: str, batches, task: str, metric: str, specs: list[str]) -> list[dict]:
  """The LoopMDM of run `d` at each inference loop setting."""
  def score():
    _, model, params, _ = load_run(d)
    rows = []
    for spec in specs:
      acc = task_accuracy(model, params, batches, source=task, loops=spec)
      rows.append(dict(loops=spec, loops_mean=acc["loops_mean"],
                       executed_loops_mean=acc["executed_loops_mean"],
                       executed_flops_per_sample=acc["executed_flops_per_sample"],
                       **{metric: acc[metric]}))
    return rows

  key = dict(metric=metric, examples=sum(len(b["tokens"]) for b in batches), specs=specs)
  return _cached(os.path.join(d, "study_loop_sweep.json"), key, score)
