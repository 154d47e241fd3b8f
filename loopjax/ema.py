"""The EMA of the weights: its decay per update and how much of the initial weights it still holds.

Update n (1 for the first) sets ema = d_n * ema + (1 - d_n) * params, with d_n = `decay` or, with
warm-up, MDLM's min(decay, (1 + n) / (10 + n)). After N updates the initial weights keep the share
prod_{n <= N} d_n of the average: decay**N without warm-up, and below 2/11 from the first update
with it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def decay_at(num_updates, decay: float, warmup: bool):
  """The decay of update number `num_updates` (an int or a traced array), float32."""
  if not warmup:
    return jnp.float32(decay)
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def init_share(steps: int, decay: float, warmup: bool) -> float:
  """prod_{n=1..steps} d_n: the weight the initial parameters still have in the average."""
  steps = max(int(steps), 0)
  if not warmup:
    return float(decay) ** steps
  # The ramp (1 + n) / (10 + n) is below `decay` for n < k, k = ceil((10 d - 1) / (1 - d)); over
  # n = 1..m its product is 10! (m + 1)! / (m + 10)!.
  k = math.ceil((10 * decay - 1) / (1 - decay)) if decay < 1 else steps + 1
  m = min(steps, max(k - 1, 0))
  log_ramp = math.lgamma(11) + math.lgamma(m + 2) - math.lgamma(m + 11)
  return math.exp(log_ramp + (steps - m) * math.log(decay)) if decay > 0 else 0.0


def is_young(steps: int, decay: float, warmup: bool) -> bool:
  """Whether the average is still mostly its initialisation: fewer than 1/(1 - decay) updates
  without warm-up (a share of about 1/e or more), and a share above 1/e with it."""
  if not warmup:
    return int(steps) < 1.0 / (1.0 - float(decay))
  return init_share(steps, decay, warmup) > math.exp(-1.0)
