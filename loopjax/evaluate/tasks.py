"""Built-in task accuracy: Sudoku cells and boards, arithmetic exact match.

Every scored position of the held-out batches is masked and decoded by a sampler (default:
greedy confidence decoding, as the trainer's end-of-run report), then scored. Besides accuracy
the result holds the loops and inference FLOPs per sample, both per sequence (what each
sequence's result took) and executed (what the batch ran: its slowest sequence's loops at every
model call; `generation_stats`), the model calls and the sampling time (after compilation), so
quality can be put beside compute.
"""

from __future__ import annotations

import numpy as np

from loopjax.data import arithmetic_exact_match, make_eval_batches, sudoku_accuracy
from loopjax.inference.denoiser import make_sampler, require_policy
from loopjax.inference.generate import run_sampler


def score(source: str, pred, tokens, fixed, scored) -> dict:
  """Task metrics of decoded rows (all arrays [N, L])."""
  if source == "sudoku":
    return {k: float(v) for k, v in sudoku_accuracy(pred, tokens, fixed).items()}
  if source == "arithmetic":
    return {"exact_match": float(np.mean(arithmetic_exact_match(pred, tokens, scored)))}
  return {"token_accuracy": float((pred == tokens)[scored].mean())}


def heldout_batches(data_cfg, examples: int, *, seed: int, batch_size: int = 64) -> list[dict]:
  """About `examples` held-out rows for task scoring: whole batches of at most `batch_size`,
  at least one."""
  bs = min(examples, batch_size)
  return make_eval_batches(data_cfg, batch_size=bs, num_batches=max(examples // bs, 1),
                           seed=seed)


def primary_metric(source: str) -> str:
  return {"sudoku": "board_accuracy", "arithmetic": "exact_match"}.get(source, "token_accuracy")


def default_steps(batches) -> int:
  """One committed token per step: as many steps as the longest answer."""
  return max(int(np.asarray(b["loss_mask"]).sum(-1).max()) for b in batches)


def _whole(v):
  """An int when a mean is a whole number (model calls of equal-length batches)."""
  return int(v) if v is not None and float(v).is_integer() else v


def task_accuracy(model, params, batches, *, source: str, loops, steps: int = 0,
                  method: str = "confidence", schedule=None, temperature=None, top_k: int = 0,
                  top_p: float = 1.0, block_len: int = 0, seed: int = 0) -> dict:
  """Decodes every scored position of the held-out batches and scores the result.

  loops: a LoopPolicy resolved for the model (`Loaded.policy`). steps = 0 commits one token per
  step.
  Returns the task metrics plus loops_mean / loops_max / nfe / flops_per_sample (per sequence),
  executed_loops (per sampler run) / executed_loops_mean (per model call) /
  executed_flops_per_sample (batch-executed FLOPs / rows), batch_size and seconds. Batches are
  weighted by their rows.
  """
  cfg = model.cfg
  policy = require_policy(loops)
  n_steps = steps or default_steps(batches)
  fn = make_sampler(model, policy, steps=n_steps, method=method, schedule=schedule,
                    block_len=block_len, temperature=temperature, top_k=top_k, top_p=top_p)
  preds, stats, seconds = [], [], 0.0
  for k, b in enumerate(batches):
    x = np.where(np.asarray(b["loss_mask"], bool), cfg.mask_id, b["tokens"])
    tokens, st, secs, _ = run_sampler(fn, cfg, params, policy, x, seed=seed + k,
                                      segment_ids_BxL=b["segment_ids"])
    seconds += secs
    preds.append(tokens)
    stats.append(st)
  cat = lambda key: np.concatenate([np.asarray(b[key]) for b in batches])
  result = score(source, np.concatenate(preds), cat("tokens"), cat("fixed").astype(bool),
                 cat("loss_mask").astype(bool))
  weights = [len(b["tokens"]) for b in batches]
  avg = lambda key: (None if any(s[key] is None for s in stats) else
                     float(np.average([s[key] for s in stats], weights=weights)))
  result.update(loops=policy.label, steps=n_steps, method=method,
                loops_mean=avg("loops_mean"), loops_max=max(s["loops_max"] for s in stats),
                nfe=_whole(avg("nfe")), flops_per_sample=avg("flops_per_sample"),
                executed_loops=avg("executed_loops"),
                executed_loops_mean=avg("executed_loops_mean"),
                executed_flops_per_sample=avg("executed_flops_per_sample"),
                batch_size=max(weights), seconds=seconds, examples=int(sum(weights)))
  return result
