"""Held-out NELBO, bits per token and perplexity bound at any loop count.

The NELBO integral over t is estimated on the fixed midpoint grid of `eval_time_grid` with one
masking draw per point and a fixed seed, so two loop counts (or two checkpoints) are compared on
the same noise. Loops are run by the inference driver (`make_denoiser`), so S > S_max and
adaptive policies are scored the same way sampling uses them.

`time_points` may also be a tuple of times (the grid itself), e.g. (1.0,) where every token
is masked and the NELBO draws no noise. Zero-shot corpora: zero_shot.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.diffusion import eval_time_grid, metrics_from_nelbo, nelbo_on_grid
from loopjax.inference.denoiser import (compiled_policy, loop_args, make_denoiser, memo,
                                       require_policy)
from loopjax.evaluate.intervals import weighted_mean_se
from loopjax.flops import forward_flops_per_seq


def make_nelbo_fn(model, schedule, policy, time_points: int):
  """Jitted fn(params, rng, tokens, fixed, loss_mask, segment_ids, loop_args(policy)) ->
  (nelbo_sum, num_tokens)."""
  policy = compiled_policy(policy)  # fixed / adaptive numbers are arguments: one program
  return memo(("nelbo", id(model), schedule, policy, time_points), model,
              lambda: _build_nelbo_fn(model, schedule, policy, time_points))


def _build_nelbo_fn(model, schedule, policy, time_points):
  grid = (jnp.asarray(time_points, jnp.float32) if isinstance(time_points, tuple)
          else eval_time_grid(time_points, schedule.eps))
  mask_id = model.cfg.mask_id

  @jax.jit
  def fn(params, rng, tokens, fixed, loss_mask, segment_ids, loop_arr):
    denoise = make_denoiser(model, params, policy, segment_ids, loop_arr)
    maskable_B = jnp.maximum((~fixed).sum(-1), 1)

    def logits_fn(x_t, t_B):
      return denoise(x_t, t_B, (x_t == mask_id).sum(-1) / maskable_B)[0]

    out = nelbo_on_grid(logits_fn, rng, tokens, schedule, mask_id, grid, fixed, loss_mask)
    return out["nelbo_sum"], out["num_tokens"]

  return fn


def heldout_nelbo(model, params, batches, *, schedule, loops, time_points: int = 8,
                  seed: int = 0, nelbo_fn=None) -> dict:
  """NELBO metrics over `batches` at loop policy `loops` (a LoopPolicy resolved for the model:
  `Loaded.policy`).

  Returns nats_per_token, bits_per_token, ppl_bound, their standard errors over batches
  (`nats_per_token_se`, `bits_per_token_se`; None for one batch), tokens (scored) and forward
  FLOPs per sequence at this S (fixed policies; None for adaptive / scheduled ones).
  """
  cfg = model.cfg
  policy = require_policy(loops)
  fn = nelbo_fn or make_nelbo_fn(model, schedule, policy, time_points)
  total, count, per_batch = 0.0, 0.0, []
  for k, b in enumerate(batches):
    fixed = jnp.asarray(b["fixed"], bool)
    s, n = fn(params, jax.random.PRNGKey(seed + k), jnp.asarray(b["tokens"]), fixed,
              jnp.asarray(b["loss_mask"], bool), jnp.asarray(b["segment_ids"]), loop_args(policy))
    total += float(s)
    count += float(n)
    per_batch.append((float(s) / max(float(n), 1.0), float(n)))
  out = {k: float(v) for k, v in metrics_from_nelbo(total, count).items()}
  # Each batch is one Monte-Carlo draw (times and masks): the spread of their per-token NELBO
  # gives the estimate's standard error (None from a single batch).
  _, se = weighted_mean_se(*zip(*per_batch)) if count else (None, None)
  out["nats_per_token_se"] = se
  out["bits_per_token_se"] = None if se is None else se / math.log(2.0)
  out["tokens"] = int(count)
  out["loops"] = policy.label
  out["forward_flops_per_seq"] = (float(forward_flops_per_seq(
      cfg, int(np.shape(batches[0]["tokens"])[1]), policy.fixed_loops))
      if policy.fixed_loops else None)
  return out
