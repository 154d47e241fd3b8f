"""Held-out NELBO, bits per token and perplexity bound at any loop count; zero-shot perplexity.

The NELBO integral over t is estimated on the fixed midpoint grid of `eval_time_grid` with one
masking draw per point and a fixed seed, so two loop counts (or two checkpoints) are compared on
the same noise. Loops are run by the inference driver (`make_denoiser`), so S > S_max and
adaptive policies are scored the same way sampling uses them.

Zero-shot: any local corpus (.txt / .jsonl / .parquet) is tokenized with the run's tokenizer,
documents joined with EOS and cut into rows of the model's length (MDLM's wrapped evaluation;
the last row is padded, padding unscored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.data.batch import make_row, stack_rows
from loopjax.data.text import encode_document, read_documents
from loopjax.data.tokenizers import fill_id
from loopjax.diffusion import eval_time_grid, metrics_from_nelbo, nelbo_on_grid
from loopjax.evaluate.denoiser import (compiled_policy, loop_args, make_denoiser, memo,
                                       resolve_policy)
from loopjax.flops import forward_flops_per_seq


def make_nelbo_fn(model, schedule, policy, time_points: int):
  """Jitted fn(params, rng, tokens, fixed, loss_mask, segment_ids, loop_args(policy)) ->
  (nelbo_sum, num_tokens)."""
  policy = compiled_policy(policy)  # fixed / adaptive numbers are arguments: one program
  return memo(("nelbo", id(model), schedule, policy, time_points), model,
              lambda: _build_nelbo_fn(model, schedule, policy, time_points))


def _build_nelbo_fn(model, schedule, policy, time_points):
  grid = eval_time_grid(time_points, schedule.eps)
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
  """NELBO metrics over `batches` at loop policy `loops` (int or spec).

  Returns nats_per_token, bits_per_token, ppl_bound, tokens (scored) and forward FLOPs per
  sequence at this S (fixed policies; None for adaptive / scheduled ones).
  """
  cfg = model.cfg
  policy = resolve_policy(cfg, loops)
  fn = nelbo_fn or make_nelbo_fn(model, schedule, policy, time_points)
  total, count = 0.0, 0.0
  for k, b in enumerate(batches):
    fixed = jnp.asarray(b["fixed"], bool)
    s, n = fn(params, jax.random.PRNGKey(seed + k), jnp.asarray(b["tokens"]), fixed,
              jnp.asarray(b["loss_mask"], bool), jnp.asarray(b["segment_ids"]), loop_args(policy))
    total += float(s)
    count += float(n)
  out = {k: float(v) for k, v in metrics_from_nelbo(total, count).items()}
  out["tokens"] = int(count)
  out["loops"] = policy.label
  out["forward_flops_per_seq"] = (float(forward_flops_per_seq(
      cfg, int(np.shape(batches[0]["tokens"])[1]), policy.loops))
      if policy.kind == "fixed" else None)
  return out


def corpus_batches(paths, tokenizer, *, seq_len: int, batch_size: int, max_rows: int = 0,
                   text_field: str = "text", txt_split: str = "paragraph") -> list[dict]:
  """A local corpus as evaluation batches: documents + EOS concatenated, rows of seq_len."""
  docs = read_documents(paths, text_field=text_field, txt_split=txt_split)
  ids = np.concatenate([encode_document(tokenizer, d) for d in docs]).astype(np.int32)
  n_rows = -(-ids.size // seq_len)
  if max_rows:
    n_rows = min(n_rows, max_rows)
  pad = fill_id(tokenizer)
  rows = []
  for r in range(n_rows):
    chunk = ids[r * seq_len:(r + 1) * seq_len]
    tokens = np.full(seq_len, pad, np.int32)
    tokens[:chunk.size] = chunk
    real = np.arange(seq_len) < chunk.size
    rows.append(make_row(tokens, fixed=~real, loss_mask=real, segment_ids=real.astype(np.int32)))
  if not rows:
    raise ValueError(f"corpus {paths} holds no tokens")
  while len(rows) % batch_size:  # whole batches (one compiled shape); filler rows score nothing
    rows.append(make_row(np.full(seq_len, pad, np.int32), fixed=np.ones(seq_len, bool),
                         loss_mask=np.zeros(seq_len, bool), segment_ids=np.zeros(seq_len,
                                                                                 np.int32)))
  return [stack_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
