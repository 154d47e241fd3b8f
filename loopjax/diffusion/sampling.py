"""Confidence-based parallel decoding (MaskGIT-style): the minimal sampler used by training's
end-of-run task evaluation. Kept as a stable entry point; the implementation is
`loopjax.diffusion.samplers.confidence_sample` (greedy, even spread of commits, no cache).

At each of `steps` steps every still-masked position is predicted (argmax), and per sequence the
ceil(remaining / steps_left) most confident predictions are committed; fixed positions never
change and no mask remains after the last step.
"""

from __future__ import annotations

import jax

from loopjax.diffusion.samplers import confidence_sample, from_logits_fn


def confidence_decode(logits_fn, x_BxL, mask_id: int, steps: int):
  """Fills every `mask_id` position of x_BxL. logits_fn(x_BxL, t_B) -> logits_BxLxV.

  No cache: a generic logits_fn may depend on t even when x did not change.
  """
  out = confidence_sample(from_logits_fn(logits_fn), jax.random.PRNGKey(0), x_BxL, mask_id,
                          steps, temperature=0.0, cache=False)
  return out["tokens"]
