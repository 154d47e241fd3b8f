"""Masking schedules alpha(t) for continuous-time masked diffusion.

alpha(t) is the probability that a token is still *unmasked* at time t in [0, 1]: alpha(0) = 1
(clean data), alpha(1) = 0 (everything is [MASK]). The continuous-time NELBO (MDLM, md4) weights
the cross-entropy of every masked position by

    weight(t) = -alpha'(t) / (1 - alpha(t))  > 0.

eps convention (the single one used throughout loopjax.diffusion): the schedules are the *pure*
closed forms on [0, 1] (no (1-2eps)(1-t)+eps reparametrisation); instead diffusion times live in
[eps, 1]. `sample_times` draws t in [eps, 1], `eval_time_grid` places its points in [eps, 1], and
`weight` clamps t into [eps, 1] so it is finite even if a caller passes t = 0. With the default
eps = 1e-3 the largest weight is 1/eps = 1e3 (linear), ~2/eps (cosine), p/eps (poly). The training
objective is therefore the NELBO integrand averaged over t ~ U[eps, 1].

`mask_prob(t) = 1 - alpha(t)` is computed in closed form (t, 2 sin^2(pi t / 4), t^p) rather than
as `1 - alpha(t)`, because in float32 `1 - (1 - t)` loses ~4 digits at t = 1e-3 and the weight
divides by it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

SCHEDULES = ("linear", "cosine", "poly")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A masking schedule; frozen (hashable) so it can be a static argument or closed over in jit.

  Attributes:
    name: "linear" (alpha = 1 - t, MDLM's log-linear), "cosine" (alpha = cos(pi t / 2)) or
      "poly" (alpha = 1 - t**exponent).
    exponent: the power of the "poly" schedule (ignored otherwise); must be > 0.
    eps: lower end of the time range [eps, 1]; see the module docstring.
  """

  name: str = "linear"
  exponent: float = 1.0
  eps: float = 1e-3

  def __post_init__(self):
    if self.name not in SCHEDULES:
      raise ValueError(
          f"diffusion.schedule: unknown schedule {self.name!r}; expected one of {SCHEDULES}")
    if not self.exponent > 0:
      raise ValueError(f"diffusion.exponent must be > 0, got {self.exponent}")
    if not 0.0 < self.eps < 1.0:
      raise ValueError(f"diffusion.eps must be in (0, 1), got {self.eps}")

  def alpha(self, t):
    """Probability that a token is still unmasked at time t (exact closed form on [0, 1])."""
    t = jnp.asarray(t, jnp.float32)
    if self.name == "linear":
      a = 1.0 - t
    elif self.name == "cosine":
      a = jnp.cos(0.5 * jnp.pi * t)
    else:
      a = 1.0 - t**self.exponent
    # float32 cos(pi/2) is -4e-8; keep alpha a probability.
    return jnp.clip(a, 0.0, 1.0)

  def mask_prob(self, t):
    """1 - alpha(t), computed without cancellation near t = 0."""
    t = jnp.asarray(t, jnp.float32)
    if self.name == "linear":
      m = t
    elif self.name == "cosine":
      m = 2.0 * jnp.sin(0.25 * jnp.pi * t) ** 2
    else:
      m = t**self.exponent
    return jnp.clip(m, 0.0, 1.0)

  def dalpha(self, t):
    """d alpha / dt (analytic, <= 0). For poly with exponent < 1 it is -inf at t = 0."""
    t = jnp.asarray(t, jnp.float32)
    if self.name == "linear":
      return -jnp.ones_like(t)
    if self.name == "cosine":
      return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t)
    return -self.exponent * t ** (self.exponent - 1.0)

  def weight(self, t):
    """NELBO weight -alpha'(t) / (1 - alpha(t)) > 0, with t clamped into [eps, 1] (finite)."""
    t = jnp.clip(jnp.asarray(t, jnp.float32), self.eps, 1.0)
    return -self.dalpha(t) / self.mask_prob(t)


def make_schedule(cfg: Mapping[str, Any]) -> Schedule:
  """Builds a Schedule from the `diffusion` config section (dict or ConfigDict).

  Reads `schedule` (default "linear"), `exponent` (default 1.0) and `eps` (default 1e-3); other
  keys of the section (sampler settings, ...) are ignored.
  """
  get = cfg.get
  name = get("schedule", "linear")
  if name not in SCHEDULES:
    raise ValueError(
        f"diffusion.schedule: unknown schedule {name!r}; expected one of {SCHEDULES}")
  exponent = float(get("exponent", 1.0))
  eps = float(get("eps", 1e-3))
  return Schedule(name=name, exponent=exponent, eps=eps)
