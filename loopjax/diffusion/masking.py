"""Forward process of masked diffusion: diffusion times and the masking of clean tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_times(rng, batch_size: int, *, antithetic: bool = True, eps: float = 1e-3):
  """Draws one diffusion time per sequence, float32 [B] in [eps, 1].

  antithetic=True is the low-discrepancy sampler of MDLM/md4: one shared u ~ U[0, 1) and
  t_i = (u + i / B) mod 1, so the batch covers [0, 1) with one point per stratum of width 1/B.
  Each t_i is still marginally uniform (the estimator stays unbiased) but the batch mean of the
  NELBO has much lower variance than with i.i.d. times. The result is mapped affinely to
  [eps, 1] (eps: see `schedules`; pass `schedule.eps`).
  """
  if antithetic:
    u = jax.random.uniform(rng, (), jnp.float32)
    t_B = jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  else:
    t_B = jax.random.uniform(rng, (batch_size,), jnp.float32)
  return jnp.clip(eps + (1.0 - eps) * t_B, eps, 1.0)


def mask_tokens(rng, tokens_BxL, alpha_B, mask_id: int, fixed_BxL=None):
  """Replaces each token by `mask_id` independently with probability 1 - alpha.

  Args:
    rng: PRNG key.
    tokens_BxL: clean integer tokens x_0.
    alpha_B: per-sequence probability of staying unmasked, alpha(t_B) (a scalar also works).
    mask_id: the [MASK] id (= vocabulary size V).
    fixed_BxL: optional bool; True where the token is given and must never be masked (prompt,
      given Sudoku cells, padding).

  Returns:
    (x_t_BxL, masked_BxL): the noised tokens (same dtype as `tokens_BxL`) and a bool array that is
    True exactly where a mask was placed. `masked` is what the NELBO scores.
  """
  alpha_Bx1 = jnp.reshape(jnp.asarray(alpha_B, jnp.float32), (-1, 1))
  u_BxL = jax.random.uniform(rng, tokens_BxL.shape, jnp.float32)
  # u in [0, 1): P(u >= alpha) = 1 - alpha, with alpha = 1 -> never, alpha = 0 -> always.
  masked_BxL = u_BxL >= alpha_Bx1
  if fixed_BxL is not None:
    masked_BxL = masked_BxL & ~fixed_BxL.astype(bool)
  x_t_BxL = jnp.where(masked_BxL, jnp.asarray(mask_id, tokens_BxL.dtype), tokens_BxL)
  return x_t_BxL, masked_BxL
