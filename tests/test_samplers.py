"""Samplers and loop policies: given tokens, no leftover masks, the ancestral schedule (a
statistical test against fixed logits), cache exactness, float32 sampling precision against a
float64 reference, and adaptive loops on a synthetic contraction and on a tiny LoopedTransformer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.diffusion import Schedule
from loopjax.loops import LoopPolicy, relative_change, run_loops
from loopjax.diffusion.samplers import (confidence_sample, exponential32, filter_logits,
                                        from_logits_fn, sample, sample_categorical)

V, MASK = 7, 7


def fixed_logits(b, length, seed=0):
  """A known denoiser: logits that ignore the input (no network)."""
  logits = jax.random.normal(jax.random.PRNGKey(seed), (b, length, V)) * 2.0
  return from_logits_fn(lambda x, t: logits[:x.shape[0], :x.shape[1]])


def prompt_and_infill(b=6, length=24, seed=1):
  """Rows with a given prefix and scattered given tokens (infilling); the rest masked."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, V, (b, length)).astype(np.int32)
  given = rng.random((b, length)) < 0.3
  given[:, :4] = True  # a prompt
  return jnp.asarray(np.where(given, x, MASK)), given, x


@functools.partial(jax.jit, static_argnames=("method", "steps", "block_len", "top_k", "top_p",
                                             "cache", "schedule"))
def run_sampler(x, rng, *, method, steps, block_len=0, top_k=0, top_p=1.0, cache=True,
                schedule=None):
  return sample(fixed_logits(*x.shape), rng, x, MASK, steps, method=method, schedule=schedule,
                block_len=block_len, top_k=top_k, top_p=top_p, cache=cache)


@pytest.mark.parametrize("method,steps,block_len,top_k,top_p", [
    ("ancestral", 5, 0, 0, 1.0), ("confidence", 6, 8, 2, 1.0), ("ancestral", 30, 8, 3, 0.8)])
def test_given_tokens_never_change_and_no_mask_remains(method, steps, block_len, top_k, top_p):
  x, given, truth = prompt_and_infill()
  out = run_sampler(x, jax.random.PRNGKey(3), method=method, steps=steps, block_len=block_len,
                    top_k=top_k, top_p=top_p)
  tok = np.asarray(out["tokens"])
  assert np.array_equal(tok[given], truth[given]), "a given (prompt/infill) token changed"
  assert not np.any(tok == MASK), "a [MASK] survived the last step"
  assert tok.min() >= 0 and tok.max() < V
  # every masked position was unmasked exactly once over the steps
  assert np.array_equal(np.asarray(out["unmasked_TxB"]).sum(0), (~given).sum(1))


def test_semi_autoregressive_blocks_fill_left_to_right():
  x = jnp.full((2, 16), MASK, jnp.int32)
  out = run_sampler(x, jax.random.PRNGKey(0), method="confidence", steps=8, block_len=4)
  per_step = np.asarray(out["unmasked_TxB"])  # 4 blocks x 2 steps
  assert per_step.shape == (8, 2)
  assert np.array_equal(per_step.reshape(4, 2, 2).sum(1), np.full((4, 2), 4))


@pytest.mark.parametrize("name", ["cosine"])  # linear is the special case m(t) = t
def test_ancestral_unmasking_follows_the_schedule(name):
  """Each position is unmasked at step j with probability m(t_j) - m(t_{j+1}), independently,
  so the count over N positions is Binomial(N, q_j). Tolerance: |z| < 5 at every step (a
  correct sampler fails with probability < 1e-5 per step; the seed is fixed anyway), and the
  mean count over all steps within 1 %."""
  b, length, steps = 64, 64, 8
  schedule = Schedule(name)
  x = jnp.full((b, length), MASK, jnp.int32)
  out = run_sampler(x, jax.random.PRNGKey(7), method="ancestral", steps=steps, schedule=schedule,
                    cache=False)
  counts = np.asarray(out["unmasked_TxB"]).sum(1).astype(np.float64)
  t = np.arange(steps, -1, -1) / steps
  m = np.asarray(schedule.mask_prob(jnp.asarray(t)), np.float64)
  q = m[:-1] - m[1:]
  n = b * length
  z = (counts - n * q) / np.sqrt(n * q * (1 - q))
  assert np.all(np.abs(z) < 5), f"per-step unmask counts off the {name} schedule: z = {z}"
  assert counts.sum() == n


def test_ancestral_argmax_endpoint_stops_at_eps_then_takes_the_argmax():
  """MDLM's endpoint: on t_j = 1 - j (1 - eps) / steps a position is unmasked at step j with
  probability m(t_j) - m(t_{j+1}), is still masked at t = eps with probability m(eps) = eps
  (linear), and then takes the argmax of one more call made at t = eps. Token V-1 is forbidden
  before that call and is the argmax (by a small margin) in it, so it marks exactly the
  positions the last call filled, and only an argmax gives it to all of them."""
  b, length, steps, eps = 32, 32, 6, 0.05
  noise = jax.random.normal(jax.random.PRNGKey(0), (b, length, V)) * 2.0
  early = noise.at[..., V - 1].set(-jnp.inf)
  last = noise.at[..., V - 1].set(noise.max(-1) + 0.1)
  seen_t = []

  def fn(x, t_B):
    jax.debug.callback(lambda t: seen_t.append(float(t[0])), t_B)
    return jnp.where(t_B[:, None, None] < 1.5 * eps, last, early)

  x = jnp.full((b, length), MASK, jnp.int32)
  out = jax.jit(lambda x: sample(from_logits_fn(fn), jax.random.PRNGKey(7), x, MASK, steps,
                                 cache=False, final_step="argmax", eps=eps))(x)
  tok = np.asarray(out["tokens"])
  t = 1.0 - np.arange(steps + 1) * (1.0 - eps) / steps
  np.testing.assert_allclose(seen_t, t, rtol=1e-6)
  counts = np.asarray(out["unmasked_TxB"]).sum(1).astype(np.float64)
  assert counts.shape == (steps + 1,) and int(out["nfe"]) == steps + 1
  q = np.append(t[:-1] - t[1:], eps)
  n = b * length
  z = (counts - n * q) / np.sqrt(n * q * (1 - q))
  assert np.all(np.abs(z) < 5), f"per-step unmask counts off the eps grid: z = {z}"
  assert not np.any(tok == MASK) and counts.sum() == n
  assert (tok == V - 1).sum() == counts[-1] > 0
  with pytest.raises(ValueError, match="final_step"):
    sample(fixed_logits(b, length), jax.random.PRNGKey(0), x, MASK, steps, final_step="greedy")


def test_cache_skips_calls_and_is_exact():
  """With more steps than positions most ancestral steps change nothing: the cache must skip
  those calls and give exactly the tokens of the uncached sampler."""
  x = jnp.full((3, 6), MASK, jnp.int32)
  kw = dict(method="ancestral", steps=40)
  cached = run_sampler(x, jax.random.PRNGKey(5), cache=True, **kw)
  plain = run_sampler(x, jax.random.PRNGKey(5), cache=False, **kw)
  assert np.array_equal(cached["tokens"], plain["tokens"])
  changed = np.asarray(cached["unmasked_TxB"]).sum(1) > 0
  assert int(cached["nfe"]) == 1 + int(changed[:-1].sum()) < 40
  assert int(plain["nfe"]) == 40
  assert np.all(np.asarray(cached["loops_TxB"])[1:][~changed[:-1]] == 0)


def test_confidence_sample_keeps_the_lowest_confidence_masked():
  """Step 1 of 2 commits the 2 most confident of 4 (positions 2 and 0); the two least
  confident stay masked and are decoded at step 2, where the denoiser prefers token 1."""
  first = jnp.log(jnp.asarray([[[0.9, 0.1], [0.6, 0.4], [0.99, 0.01], [0.55, 0.45]]]))
  second = jnp.log(jnp.asarray([[[0.2, 0.8]] * 4]))

  def fn(x, t_B):  # grid time: 1 at step 1, 0.5 at step 2
    return jnp.where(t_B[:, None, None] > 0.75, first, second)

  decode = lambda x, steps: confidence_sample(from_logits_fn(fn), jax.random.PRNGKey(0), x, 2,
                                              steps, temperature=0.0, cache=False)["tokens"]
  out = jax.jit(lambda x: decode(x, 2))(jnp.full((1, 4), 2, jnp.int32))
  assert np.array_equal(out, [[0, 1, 0, 1]])
  given = jax.jit(lambda x: decode(x, 3))(jnp.asarray([[2, 0, 2, 2]]))
  assert given[0, 1] == 0 and not np.any(np.asarray(given) == 2)


def test_exponential_keeps_relative_precision_for_small_values():
  """E = -log1p(-bits * 2^-32): the small E that win the race are exact to float32 relative
  precision down to 2^-32, where Gumbel from a float32 uniform cannot go below ~6e-8."""
  bits = jnp.asarray([1, 2, 3, 1000, 2**20 + 7], jnp.uint32)
  v = np.asarray(bits, np.float64) * 2.0**-32
  want = -np.log1p(-v)
  got = np.maximum(-np.log1p(-np.minimum(np.asarray(bits, np.float32) * np.float32(2.0**-32),
                                         np.float32(1 - 2**-24))), 2.0**-33)
  assert np.allclose(got, want, rtol=1e-6, atol=0)
  e = np.asarray(exponential32(jax.random.PRNGKey(0), (200_000,)), np.float64)
  assert abs(e.mean() - 1.0) < 0.01 and e.min() > 0


@pytest.mark.parametrize("top_k,top_p,temp", [(0, 1.0, 1.0), (3, 1.0, 0.5), (0, 0.7, 1.0)])
def test_categorical_matches_float64_reference(top_k, top_p, temp):
  """Empirical frequencies over 60k draws against the float64 NumPy distribution (top-k / top-p
  filtered, tempered). Tolerance: 5 binomial standard deviations per category."""
  logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0])
  ref = logits / temp
  order = np.argsort(-ref)
  keep = np.ones(V, bool)
  if top_k:
    keep[order[top_k:]] = False
  if top_p < 1:
    p_sorted = np.exp(ref[order] - ref.max()) / np.exp(ref - ref.max()).sum()
    inside = (np.cumsum(p_sorted) - p_sorted) < top_p
    keep[order[~inside]] = False
  p = np.where(keep, np.exp(ref - ref.max()), 0.0)
  p /= p.sum()
  n = 60_000
  x = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n // 100, 100, V))
  ids, prob = jax.jit(sample_categorical, static_argnums=(2, 3, 4))(
      jax.random.PRNGKey(11), x, temp, top_k, top_p)
  freq = np.bincount(np.asarray(ids).ravel(), minlength=V) / n
  assert np.all(freq[~keep] == 0), "a filtered token was sampled"
  sd = np.sqrt(p * (1 - p) / n) + 1e-12
  assert np.all(np.abs(freq - p) < 5 * sd + 1e-9), (freq, p)
  assert np.allclose(np.asarray(prob)[0, 0], p[np.asarray(ids)[0, 0]], rtol=1e-5)


def test_filter_logits_keeps_argmax_at_tiny_top_p():
  out = np.asarray(filter_logits(jnp.asarray([[[0.0, 3.0, 1.0]]]), top_p=1e-6))
  assert np.isfinite(out[0, 0, 1]) and np.all(np.isinf(out[0, 0, [0, 2]]))


# ------------------------------------------------------------------ loop policies


def test_policy_parsing_and_schedules():
  assert LoopPolicy.parse("24").loops == 24
  a = LoopPolicy.parse("adaptive:0.01", s_max=12)
  assert (a.tau, a.min_loops, a.max_loops) == (0.01, 1, 12)
  assert LoopPolicy.parse("adaptive:0.1:2:30").largest == 30
  ramp = LoopPolicy.parse("time:2:10")
  lo, hi, _ = ramp.bounds(jnp.asarray([0.0, 0.5, 1.0]), jnp.zeros(3))
  assert np.array_equal(lo, [2, 6, 10]) and np.array_equal(lo, hi)
  table = LoopPolicy.parse("mask:8,4,2")  # bins of the masked fraction r
  lo, _, _ = table.bounds(jnp.zeros(4), jnp.asarray([0.0, 0.4, 0.7, 1.0]))
  assert np.array_equal(lo, [8, 4, 2, 2])
  assert ramp.time_dependent and not table.time_dependent
  for bad in ("-1", "fixed:0", "adaptive", "adaptive:-1", "adaptive:0.1:3:2", "time:0:4", "foo:1",
              "x"):
    with pytest.raises(ValueError, match="loops"):
      LoopPolicy.parse(bad, s_max=4)
  # 0 / max: S_max of the model, which must be known.
  assert LoopPolicy.parse("0", s_max=4).loops == LoopPolicy.parse("max", s_max=4).loops == 4
  with pytest.raises(ValueError, match="S_max is not known"):
    LoopPolicy.parse("max")


def _contraction(rates_B):
  """h <- rate * h + 1 per sequence: relative change shrinks geometrically (known stop)."""
  return lambda h, i: rates_B[:, None, None] * h + 1.0


def test_run_loops_adaptive_matches_reference_and_freezes():
  b, length, d = 3, 4, 2
  rates = jnp.asarray([0.1, 0.5, 0.9])
  h0 = jnp.ones((b, length, d))
  watch = jnp.ones((b, length), bool)
  tau, lo, hi = 0.05, 2, 30
  h, loops = jax.jit(run_loops, static_argnums=0)(
      _contraction(rates), h0, watch, jnp.full(b, lo), jnp.full(b, hi), tau)
  for k, r in enumerate(np.asarray(rates, np.float64)):  # float64 reference, one sequence
    x, n = 1.0, 0
    while True:
      new = r * x + 1.0
      change, x, n = abs(new - x) / abs(x), new, n + 1
      if n >= hi or (n >= lo and change < tau):
        break
    assert loops[k] == n
    assert np.allclose(h[k], x, rtol=1e-5), "a finished sequence's state was not frozen"
  assert len(set(np.asarray(loops).tolist())) == 3  # per-sequence, not per-batch


def test_run_loops_tau_zero_runs_max_and_huge_tau_runs_min():
  h0 = jnp.ones((2, 3, 2))
  watch = jnp.ones((2, 3), bool)
  fn = jax.jit(run_loops, static_argnums=0)
  step = _contraction(jnp.asarray([0.5, 0.5]))
  _, loops = fn(step, h0, watch, jnp.asarray([1, 2]), jnp.asarray([5, 7]), 0.0)
  assert np.array_equal(loops, [5, 7])
  _, loops = fn(step, h0, watch, jnp.asarray([1, 2]), jnp.asarray([5, 7]), 1e9)
  assert np.array_equal(loops, [1, 2])
  # no watched (masked) positions: the change is 0, so adaptive stops at the minimum
  _, loops = fn(step, h0, jnp.zeros((2, 3), bool), jnp.asarray([3, 3]), jnp.asarray([9, 9]),
                1e-6)
  assert np.array_equal(loops, [3, 3])
  assert float(relative_change(2 * h0, h0, watch)[0]) == pytest.approx(1.0)


# ------------------------------------------------------------------ a tiny LoopedTransformer


@pytest.fixture(scope="module")
def tiny():
  from loopjax.model import LoopedTransformer, ModelConfig
  cfg = ModelConfig(kernels="reference",
                    vocab_size=V, max_length=12, width=32, num_layers=3, num_heads=2,
                    cond_dim=16, loop_start=1, loop_end=2, max_loops=3)
  model = LoopedTransformer(cfg)
  return model, random_params(model, 12)


def random_params(model, length, scale=0.2, seed=0):
  """Random weights of the model's shapes, without compiling `init` (slow on 2 shared cores).
  Not the adaLN-zero init, under which every block is the identity and all S would agree."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32),
                          1)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), shapes)


def test_adaptive_tau_zero_equals_fixed_s_max_and_huge_tau_runs_minimum(tiny):
  from loopjax.inference.denoiser import compiled_policy, loop_args, make_denoiser
  from loopjax.loops import resolve_policy
  model, params = tiny
  x = jnp.asarray(np.where(np.random.default_rng(0).random((4, 12)) < 0.5, MASK,
                           np.random.default_rng(1).integers(0, V, (4, 12))), jnp.int32)
  t, r = jnp.full(4, 0.5), jnp.full(4, 0.5)

  # One program per kind: every fixed S runs the model's own loop, every adaptive rule the
  # while loop that measures the change per iteration.
  programs = {kind: jax.jit(lambda arr, kind=kind: make_denoiser(
      model, params, compiled_policy(resolve_policy(model.cfg, kind)), loop_arr=arr)(x, t, r))
      for kind in ("3", "adaptive:0")}
  run = lambda spec: programs["3" if spec.isdigit() else "adaptive:0"](
      loop_args(resolve_policy(model.cfg, spec)))

  ref = model.apply({"params": params}, x, 3)  # the model's own scan over S_max = 3
  fixed, loops_f = run("3")
  adapt, loops_a = run("adaptive:0")
  assert np.array_equal(loops_a, [3] * 4) and np.array_equal(loops_f, [3] * 4)
  assert np.array_equal(np.asarray(adapt), np.asarray(fixed))
  assert np.allclose(fixed, ref, atol=1e-4)
  _, loops_min = run("adaptive:1e9:2:3")
  assert np.array_equal(loops_min, [2] * 4)
  beyond, loops_b = run("5")  # S > S_max: runs, and really runs 5 iterations
  assert np.array_equal(loops_b, [5] * 4)
  assert np.abs(np.asarray(beyond) - np.asarray(fixed)).max() > 1e-3
  assert np.allclose(beyond, model.apply({"params": params}, x, 5), atol=1e-4)
  assert programs["3"]._cache_size() == 1 and programs["adaptive:0"]._cache_size() == 1
  hlo = programs["3"].lower(loop_args(resolve_policy(model.cfg, "3"))).as_text()
  assert "stablehlo.sqrt" not in hlo, "a fixed S runs no per-iteration relative change"


def test_loop_embedding_refuses_s_beyond_s_max_and_cache_guard():
  import dataclasses

  from loopjax.inference.denoiser import make_sampler
  from loopjax.loops import resolve_policy
  from loopjax.model import LoopedTransformer, ModelConfig
  cfg = ModelConfig(kernels="reference",
                    vocab_size=V, max_length=8, width=32, num_layers=3, num_heads=2,
                    cond_dim=16, loop_start=1, loop_end=2, max_loops=3, loop_embedding=True)
  assert resolve_policy(cfg, "3").loops == 3
  with pytest.raises(ValueError, match="loop embedding"):
    resolve_policy(cfg, "4")
  with pytest.raises(ValueError, match="loop embedding"):
    resolve_policy(cfg, "adaptive:0.1:1:6")
  timed_cfg = dataclasses.replace(cfg, loop_embedding=False, time_conditioning=True)
  with pytest.raises(ValueError, match="cache"):
    make_sampler(LoopedTransformer(timed_cfg), resolve_policy(timed_cfg, "2"), steps=2,
                 cache=True)
