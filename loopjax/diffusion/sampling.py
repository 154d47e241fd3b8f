"""Confidence-based parallel decoding (MaskGIT-style): the minimal sampler used by training's
end-of-run task evaluation. Pure function of a logits callback; one jitted program.

At each of `steps` steps every still-masked position is predicted (argmax), and per sequence the
ceil(remaining / steps_left) most confident predictions are committed; fixed positions never
change and no mask remains after the last step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def confidence_decode(logits_fn, x_BxL, mask_id: int, steps: int):
  """Fills every `mask_id` position of x_BxL. logits_fn(x_BxL, t_B) -> logits_BxLxV."""
  b, length = x_BxL.shape

  def body(s, x):
    masked = x == mask_id
    remaining = masked.sum(-1)
    t_B = remaining.astype(jnp.float32) / length
    logp = jax.nn.log_softmax(logits_fn(x, t_B), axis=-1)
    pred, conf = jnp.argmax(logp, -1), jnp.max(logp, -1)
    conf = jnp.where(masked, conf, -jnp.inf)
    k_B = -(-remaining // (steps - s))  # ceil: the last step commits everything left
    rank = jnp.argsort(jnp.argsort(-conf, axis=-1), axis=-1)
    commit = masked & (rank < k_B[:, None])
    return jnp.where(commit, pred.astype(x.dtype), x)

  return jax.lax.fori_loop(0, steps, body, x_BxL)
