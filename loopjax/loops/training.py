"""The training distribution of S: one S per step from a `LoopDistribution`, parsed once from
config `loops.train` (grammar: loopjax.loops)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LoopDistribution:
  probs: tuple[float, ...]  # probs[k-1] = P(S = k)

  @classmethod
  def parse(cls, spec: str | int) -> "LoopDistribution":
    """Parses a spec (see the module docstring); an int or a bare integer string is fixed."""
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    if not sep:
      kind, rest = "fixed", text
    try:
      if kind == "fixed":
        s = int(rest)
        if s < 1:
          raise ValueError
        probs = [0.0] * (s - 1) + [1.0]
      elif kind == "uniform":
        lo, hi = (int(v) for v in rest.split(":"))
        if not 1 <= lo <= hi:
          raise ValueError
        probs = [0.0] * (lo - 1) + [1.0] * (hi - lo + 1)
      elif kind == "table":
        probs = [float(v) for v in rest.split(",")]
        if any(p < 0 for p in probs) or sum(probs) <= 0:
          raise ValueError
      else:
        raise ValueError
    except ValueError:
      raise ValueError(f"loops.train: cannot parse {spec!r}; expected 'S' or 'fixed:S' (S >= 1), "
                       "'uniform:LO:HI' (1 <= LO <= HI) or 'table:p1,p2,...' (non-negative, not "
                       "all zero)") from None
    total = sum(probs)
    return cls(tuple(p / total for p in probs))

  @property
  def max_loops(self) -> int:
    return len(self.probs)

  @property
  def expected(self) -> float:
    return float(sum((k + 1) * p for k, p in enumerate(self.probs)))

  def sample(self, rng: jax.Array) -> jax.Array:
    """One S for the whole global batch, as an int32 scalar (traced-friendly)."""
    logits = jnp.log(jnp.asarray(np.asarray(self.probs), jnp.float32))
    return (jax.random.categorical(rng, logits) + 1).astype(jnp.int32)
