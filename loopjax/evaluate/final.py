"""End-of-run report: held-out task accuracy for built-in tasks, printed and saved."""

from __future__ import annotations

import json

import jax

from loopjax import storage
from loopjax.evaluate.tasks import heldout_batches, task_accuracy


def report_task_accuracy(config, out: dict, workdir: str) -> dict | None:
  """Held-out task accuracy of a finished run (`out`: what `loopjax.train.loop.train` returns),
  printed and written to WORKDIR/eval/final_task_accuracy.json; None for data without a task
  metric and in multi-process runs."""
  source = config.data.source
  if source not in ("sudoku", "arithmetic") or jax.process_count() > 1:
    return None
  model, state = out["model"], out["state"]
  params = state.ema_params if config.train.eval_params == "ema" else state.params
  batches = heldout_batches(config.data, int(config.eval.examples), seed=config.train.seed + 1)
  loops = config.eval.loops or model.cfg.max_loops
  acc = task_accuracy(model, jax.device_get(params), batches, source=source, loops=loops,
                      steps=config.eval.steps)
  acc = {"loops": loops, "examples": sum(len(b["tokens"]) for b in batches), **acc}
  storage.makedirs(storage.join(workdir, "eval"))
  storage.write_text(storage.join(workdir, "eval", "final_task_accuracy.json"),
                     json.dumps(acc, indent=2))
  print("held-out " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in acc.items()), flush=True)
  return acc
