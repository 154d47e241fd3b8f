"""Continuous-time masked-diffusion NELBO (MDLM / md4), its metrics and a low-variance eval.

For a clean sequence x_0 and t ~ U[eps, 1] the NELBO is

    E_t E_{x_t ~ q(.|x_0, t)} [ sum_{l : x_t^l = [MASK]} weight(t) * -log p_theta(x_0^l | x_t) ],

weight(t) = -alpha'(t) / (1 - alpha(t)). Unmasked positions contribute nothing: the denoiser
copies them (carry-over unmasking), so only masked positions are scored. The head outputs the V
real-vocabulary logits; [MASK] = V is never a prediction target.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from loopjax.diffusion.masking import mask_tokens


def diffusion_loss(logits_BxLxV, tokens_BxL, masked_BxL, t_B, schedule, loss_mask_BxL=None):
  """NELBO of one batch at the sampled times (`nelbo_terms` of the tokens' `token_nll`).

  Args:
    logits_BxLxV: denoiser output over the real vocabulary (any float dtype; the log-softmax is
      computed in float32), possibly padded with columns of a large negative logit (which add
      nothing to the normaliser).
    tokens_BxL, masked_BxL, t_B, schedule, loss_mask_BxL: as `nelbo_terms`.
  """
  return nelbo_terms(token_nll(logits_BxLxV, tokens_BxL), masked_BxL, t_B, schedule,
                     loss_mask_BxL)


def token_nll(logits_BxLxV, tokens_BxL):
  """-log softmax(logits)[token] per position, float32 B x L.

  A target outside [0, V) gives NaN (see `nelbo_terms`): it is a bug, not something to clamp."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  # logsumexp(logits) - logits[token]: no [B,L,V] log-softmax array.
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_BxL = jnp.take_along_axis(
      logits_BxLxV, tokens_BxL[..., None].astype(jnp.int32), axis=-1,
      mode="fill", fill_value=jnp.nan)[..., 0]
  return lse_BxL - target_BxL


def chunked_token_nll(logits_fn, h_BxLxD, tokens_BxL, chunk: int):
  """`token_nll(logits_fn(h), tokens)` computed `chunk` positions of the length at a time.

  Each chunk's logits (B x chunk x V, float32 for the log-softmax) are built, reduced to its
  B x chunk NLLs and dropped; under differentiation each chunk is rematerialised, so the
  backward rebuilds one chunk's logits at a time instead of keeping B x L x V. The
  projection's gradient is summed over the chunks. `chunk` >= L (or not dividing L): one
  chunk, no rematerialisation, the same program as `token_nll(logits_fn(h), tokens)`.
  """
  b, length = tokens_BxL.shape
  if chunk <= 0 or chunk >= length or length % chunk:
    return token_nll(logits_fn(h_BxLxD), tokens_BxL)
  n = length // chunk

  def one(h_and_tokens):
    h_BxCxD, tokens_BxC = h_and_tokens
    return token_nll(logits_fn(h_BxCxD), tokens_BxC)

  # Chunks on a leading axis: the batch keeps its (sharded) place on every chunk.
  chunks = lambda x: x.reshape((b, n, chunk) + x.shape[2:]).swapaxes(0, 1)
  nll_NxBxC = jax.lax.map(jax.checkpoint(one), (chunks(h_BxLxD), chunks(tokens_BxL)))
  return nll_NxBxC.swapaxes(0, 1).reshape(b, length)


def nelbo_terms(nll_BxL, masked_BxL, t_B, schedule, loss_mask_BxL=None):
  """NELBO of one batch from the per-position NLLs of the clean tokens.

  Normaliser: `loss = nelbo_sum / max(num_tokens, 1)` where `num_tokens = loss_mask_BxL.sum()`
  counts the *scored* positions (masked or not; loss_mask defaults to all ones, and the caller
  sets it to False at padding / prompt / given cells). So `loss` is the NELBO in nats per scored
  token, an upper bound on -log p(x_0) / num_tokens, comparable across batches with different
  mask counts. It is not divided by the number of masked positions (that would bias the bound).

  Args:
    nll_BxL: -log p_theta(x_0^l | x_t), float32 (`token_nll`); NaN where the target was out of
      range, which makes the loss NaN at a scored masked position and is ignored elsewhere.
    masked_BxL: bool, True where x_t holds [MASK] (from `mask_tokens`).
    t_B: diffusion time of each sequence.
    schedule: a `Schedule`.
    loss_mask_BxL: optional bool/0-1 array of positions that count.

  Returns:
    dict of float32 scalars: `loss`, `nelbo_sum` (sum over the batch of weight * NLL, nats),
    `num_tokens` (scored positions), `masked_fraction` (masked scored / scored).
  """
  if loss_mask_BxL is None:
    loss_mask_BxL = jnp.ones(nll_BxL.shape, bool)
  loss_mask_BxL = loss_mask_BxL.astype(bool)
  scored_BxL = masked_BxL.astype(bool) & loss_mask_BxL

  weight_B = schedule.weight(t_B)
  # `where`, not a product: unscored positions may hold out-of-range targets (NaN above).
  term_BxL = jnp.where(scored_BxL, weight_B[:, None] * nll_BxL, 0.0)

  nelbo_sum = term_BxL.sum()
  num_tokens = loss_mask_BxL.sum().astype(jnp.float32)
  denom = jnp.maximum(num_tokens, 1.0)
  return {
      "loss": nelbo_sum / denom,
      "nelbo_sum": nelbo_sum,
      "num_tokens": num_tokens,
      "masked_fraction": scored_BxL.sum().astype(jnp.float32) / denom,
  }


def metrics_from_nelbo(nelbo_sum, num_tokens):
  """Per-token likelihood metrics from an accumulated NELBO (sum over many batches is fine).

  Returns `nats_per_token` = nelbo_sum / max(num_tokens, 1), `bits_per_token` = nats / ln 2 and
  `ppl_bound` = exp(nats_per_token), an upper bound on the perplexity.
  """
  num_tokens = jnp.asarray(num_tokens, jnp.float32)
  nats = jnp.asarray(nelbo_sum, jnp.float32) / jnp.maximum(num_tokens, 1.0)
  return {
      "nats_per_token": nats,
      "bits_per_token": nats / math.log(2.0),
      "ppl_bound": jnp.exp(nats),
  }


def eval_time_grid(num_points: int, eps: float = 1e-3):
  """Midpoints of `num_points` equal cells of [eps, 1], float32 [K].

  The midpoint rule replaces the Monte-Carlo draw of t in held-out evaluation, so the NELBO of
  two checkpoints is compared on the same times (the time draw is the dominant variance).
  """
  k = jnp.arange(num_points, dtype=jnp.float32)
  return eps + (1.0 - eps) * (k + 0.5) / num_points


def nelbo_on_grid(logits_fn, rng, tokens, schedule, mask_id, grid, fixed=None, loss_mask=None):
  """NELBO of a batch averaged over a fixed time grid (each point: one masking draw).

  Args:
    logits_fn: `(x_t_BxL, t_B) -> logits_BxLxV`, e.g. a closure over `model.apply` and params.
    rng: PRNG key; grid point k masks with `fold_in(rng, k)`.
    tokens: clean tokens [B, L].
    schedule: a `Schedule`.
    mask_id: the [MASK] id.
    grid: times [K], e.g. `eval_time_grid(K, schedule.eps)`.
    fixed: optional bool [B, L], never masked.
    loss_mask: optional [B, L], positions that count (see `diffusion_loss`).

  Returns:
    The `diffusion_loss` dict with `nelbo_sum` and `loss` averaged over the grid (an estimate of
    the NELBO integral over t ~ U[eps, 1]); `masked_fraction` is averaged too. Runs the grid with
    `lax.map`, so memory is that of one forward pass.
  """
  batch_size = tokens.shape[0]

  def one_point(k_and_t):
    k, t = k_and_t
    t_B = jnp.full((batch_size,), t, jnp.float32)
    rng_k = jax.random.fold_in(rng, k)
    x_t, masked = mask_tokens(rng_k, tokens, schedule.alpha(t_B), mask_id, fixed)
    out = diffusion_loss(logits_fn(x_t, t_B), tokens, masked, t_B, schedule, loss_mask)
    return out["nelbo_sum"], out["masked_fraction"], out["num_tokens"]

  grid = jnp.asarray(grid, jnp.float32)
  sums_K, fracs_K, counts_K = jax.lax.map(
      one_point, (jnp.arange(grid.shape[0], dtype=jnp.int32), grid))
  nelbo_sum = sums_K.mean()
  num_tokens = counts_K[0]
  return {
      "loss": nelbo_sum / jnp.maximum(num_tokens, 1.0),
      "nelbo_sum": nelbo_sum,
      "num_tokens": num_tokens,
      "masked_fraction": fracs_K.mean(),
  }
