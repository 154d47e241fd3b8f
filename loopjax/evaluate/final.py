"""End-of-run report: held-out task accuracy for built-in tasks, printed and saved.

The run's own loop count (`loops.eval`, default S_max) gives the headline numbers; a looped
model is also scored at S = 1, 2, S_max and 2 S_max (one compiled sampler serves every S), so
the report shows what the loops do at inference: a table in the log, the rows in
WORKDIR/eval/final_task_accuracy.json and a plot, WORKDIR/plots/final_accuracy_vs_loops.png.
"""

from __future__ import annotations

import json

import jax

from loopjax import storage
from loopjax.evaluate.plots import plot_quality_vs_loops
from loopjax.evaluate.tasks import heldout_batches, primary_metric, task_accuracy
from loopjax.loops import resolve_policy

# What guessing scores: a uniform digit per blank cell; an answer field of several digits.
CHANCE = {"cell_accuracy": 1 / 9, "board_accuracy": 0.0, "exact_match": 0.0}


def report_loops(s_max: int, looped: bool, own: int) -> list[int]:
  """The loop counts of the report: 1, 2, S_max, 2 S_max and the run's own (looped models)."""
  if not looped:
    return [own]
  return sorted({1, min(2, 2 * s_max), s_max, 2 * s_max, own})


def report_task_accuracy(config, out: dict, workdir: str) -> dict | None:
  """Held-out task accuracy of a finished run (`out`: what `loopjax.train.loop.train` returns),
  printed and written to WORKDIR/eval/final_task_accuracy.json; None for data without a task
  metric and in multi-process runs."""
  source = config.data.source
  if source not in ("sudoku", "arithmetic") or jax.process_count() > 1:
    return None
  model, state = out["model"], out["state"]
  cfg = model.cfg
  params = jax.device_get(state.ema_params if config.train.eval_params == "ema"
                          else state.params)
  batches = heldout_batches(config.data, int(config.eval.examples), seed=config.train.seed + 1)
  own = int(config.loops.eval or cfg.max_loops)
  # The trained model in memory, not a load: its loop counts are resolved here, the way
  # `Loaded.policy` resolves a loaded model's.
  rows = [dict(task_accuracy(model, params, batches, source=source,
                             loops=resolve_policy(cfg, s), steps=config.eval.steps), loops=s)
          for s in report_loops(cfg.max_loops, cfg.looped, own)]
  head = next(r for r in rows if r["loops"] == own)
  metrics = [k for k in head if k in CHANCE or k.endswith("accuracy")]
  acc = {"loops": own, "examples": head["examples"], **{k: head[k] for k in metrics},
         "s_max": cfg.max_loops, "params": config.train.eval_params,
         "by_loops": [{k: r[k] for k in ("loops", *metrics, "executed_flops_per_sample")}
                      for r in rows]}
  storage.makedirs(storage.join(workdir, "eval"))
  storage.write_text(storage.join(workdir, "eval", "final_task_accuracy.json"),
                     json.dumps(acc, indent=2))
  print("held-out " + ", ".join(f"{k} {acc[k]:.4f}" if isinstance(acc[k], float) else
                                f"{k} {acc[k]}" for k in ("loops", "examples", *metrics)),
        flush=True)
  if cfg.looped:
    print(_loops_table(rows, metrics, cfg.max_loops, head["examples"], acc["params"]), flush=True)
  if not storage.is_remote(workdir):  # matplotlib writes local files
    path = plot_quality_vs_loops(
        rows, metric=primary_metric(source), group="none",
        path=storage.join(workdir, "plots", "final_accuracy_vs_loops.png"),
        title=f"held-out {primary_metric(source).replace('_', ' ')} vs loops at inference",
        s_max=cfg.max_loops)
    print(f"plot: {path}", flush=True)
  return acc


def _loops_table(rows, metrics, s_max: int, examples: int, params: str) -> str:
  """The accuracy at each S as aligned text, with what chance would score."""
  def tag(s):
    return " (S_max, trained up to)" if s == s_max else \
        " (2 S_max, beyond training)" if s == 2 * s_max else ""
  lines = [f"held-out accuracy vs loops S at inference ({examples} examples, {params} "
           "weights; chance: "
           + ", ".join(f"{m} {CHANCE[m]:.3f}" for m in metrics if m in CHANCE) + ")"]
  for r in rows:
    lines.append(f"  S={r['loops']:<3} " + "  ".join(f"{m} {r[m]:.4f}" for m in metrics)
                 + tag(r["loops"]))
  return "\n".join(lines)
