"""A loop policy is one registered class: a toy policy defined here parses, resolves, runs in
the denoiser and in the sampler with no edit anywhere else."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax import loops
from loopjax.loops import policies
from loopjax.inference.denoiser import cache_valid, loop_args, make_denoiser, make_sampler
from loopjax.loops import resolve_policy
from loopjax.evaluate.labels import policy_label

V, MASK = 7, 7


@dataclasses.dataclass(frozen=True)
class MostlyMaskedLoops(loops.LoopPolicy):
  """"deep:S": S loops for sequences more than half masked, 1 for the others."""

  prefixes = ("deep",)
  loops: int = 1
  spec: str = ""

  @classmethod
  def from_args(cls, prefix, args, s_max, spec):
    if len(args) != 1:
      raise loops.PolicyArgError("deep takes one S")
    return cls(loops=int(args[0]), spec=spec)

  def validate(self):
    if self.loops < 1:
      raise ValueError(f"--loops deep: S must be >= 1, got {self.loops}")

  @property
  def largest(self):
    return self.loops

  def legend(self):
    return f"S = {self.loops} while mostly masked"

  def bounds(self, t_B, r_B, loop_arr=None):
    s_B = jnp.where(jnp.asarray(r_B) > 0.5, self.loops, 1).astype(jnp.int32)
    return s_B, s_B, 0.0


@pytest.fixture()
def registry(monkeypatch):
  monkeypatch.setattr(policies, "REGISTRY", dict(policies.REGISTRY))
  loops.register(MostlyMaskedLoops)


@pytest.fixture(scope="module")
def tiny():
  from loopjax.model import LoopedTransformer, ModelConfig
  cfg = ModelConfig(kernels="reference",
                    vocab_size=V, max_length=12, width=32, num_layers=3, num_heads=2,
                    cond_dim=16, loop_start=1, loop_end=2, max_loops=3)
  model = LoopedTransformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32), 1)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), shapes)["params"]
  return model, params


def test_a_registered_policy_parses_with_the_one_parser(registry):
  pol = loops.LoopPolicy.parse("deep:4", s_max=3)
  assert pol == MostlyMaskedLoops(loops=4, spec="deep:4") and pol.largest == 4
  assert str(pol) == "deep:4" and pol.label == "deep:4" and pol.fixed_loops is None
  assert policy_label("deep:4") == "S = 4 while mostly masked"
  for bad in ("deep:0", "deep:1:2", "deep:x"):
    with pytest.raises(ValueError, match="--loops"):
      loops.LoopPolicy.parse(bad)
  with pytest.raises(ValueError, match="already registered"):
    loops.register(type("Clash", (MostlyMaskedLoops,), {"prefixes": ("time",)}))


def test_unregistered_prefix_names_the_registered_ones():
  with pytest.raises(ValueError, match="unknown kind 'deep'.*registered: fixed, adaptive"):
    loops.LoopPolicy.parse("deep:4")


def test_a_registered_policy_runs_in_the_denoiser_and_the_sampler(registry, tiny):
  model, params = tiny
  pol = resolve_policy(model.cfg, "deep:3")
  assert resolve_policy(model.cfg, pol) == pol  # resolving twice changes nothing
  x = np.random.default_rng(1).integers(0, V, (4, 12))
  x[:2, :9] = MASK  # rows 0, 1: 75% masked; rows 2, 3: none
  x = jnp.asarray(x, jnp.int32)
  r_B = (x == MASK).mean(-1)
  t_B = jnp.full(4, 0.5)
  logits, loops_B = make_denoiser(model, params, pol)(x, t_B, r_B)
  assert np.asarray(loops_B).tolist() == [3, 3, 1, 1]
  # Each row equals the model's own loop at that row's S.
  variables = {"params": params}
  for s, rows in ((3, slice(0, 2)), (1, slice(2, 4))):
    h0, c, mask, _ = model.apply(variables, x, t_B, None, method="encode")
    h = model.apply(variables, h0, c, mask, jnp.int32(s), method="run_loop")
    want, _ = model.apply(variables, h, c, mask, method="decode")
    np.testing.assert_allclose(np.asarray(logits[rows]), np.asarray(want[rows]), atol=1e-5)

  # The sampler: every step runs S = 3 while a row is mostly masked, 1 after.
  assert cache_valid(model.cfg, pol)
  fn = make_sampler(model, pol, steps=6, cache=False)
  start = jnp.full((2, 12), MASK, jnp.int32)
  out = fn(params, jax.random.PRNGKey(0), start, None, loop_args(pol))
  assert not np.any(np.asarray(out["tokens"]) == MASK)
  loops_TxB = np.asarray(out["loops_TxB"])
  assert set(np.unique(loops_TxB)) <= {1, 3} and loops_TxB[0].tolist() == [3, 3]
  assert loops_TxB[-1].max() == 1  # the last step: few positions left masked
