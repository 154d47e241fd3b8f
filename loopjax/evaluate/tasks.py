"""Built-in task accuracy: Sudoku cells and boards, arithmetic exact match."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.data import arithmetic_exact_match, sudoku_accuracy
from loopjax.diffusion.sampling import confidence_decode


def task_accuracy(model, params, batches, *, source: str, loops, steps: int = 0) -> dict:
  """Decodes every scored position of the held-out batches and scores the result.

  steps = 0 commits one token per step (as many steps as the longest answer).
  """
  mask_id = model.cfg.mask_id

  @jax.jit
  def decode(x, segment_ids, loops):
    fn = lambda x_t, t_B: model.apply({"params": params}, x_t, loops, t_B, segment_ids)
    return confidence_decode(fn, x, mask_id, n_steps)

  preds, tokens, fixed, scored = [], [], [], []
  n_steps = steps or max(int(np.asarray(b["loss_mask"]).sum(-1).max()) for b in batches)
  for b in batches:
    x = np.where(np.asarray(b["loss_mask"], bool), mask_id, b["tokens"])
    preds.append(np.asarray(decode(jnp.asarray(x), jnp.asarray(b["segment_ids"]),
                                   jnp.int32(loops))))
    tokens.append(b["tokens"])
    fixed.append(b["fixed"])
    scored.append(np.asarray(b["loss_mask"], bool))
  pred, tok, fix, sc = (np.concatenate(a) for a in (preds, tokens, fixed, scored))
  if source == "sudoku":
    return {k: float(v) for k, v in sudoku_accuracy(pred, tok, fix).items()}
  if source == "arithmetic":
    return {"exact_match": float(np.mean(arithmetic_exact_match(pred, tok, sc)))}
  return {"token_accuracy": float((pred == tok)[sc].mean())}
