"""Tests of loopjax.diffusion against independent float64 NumPy references and exact properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.diffusion import (
    Schedule,
    diffusion_loss,
    eval_time_grid,
    make_schedule,
    mask_tokens,
    metrics_from_nelbo,
    nelbo_on_grid,
    sample_times,
)

EPS = 1e-3
# Jitted once per shape: on 2 shared cores one compiled program is much cheaper than op-by-op
# dispatch of every primitive. (The schedule is static: a frozen, hashable dataclass.)
loss_fn = jax.jit(diffusion_loss, static_argnums=4)
mask_fn = jax.jit(mask_tokens, static_argnums=3)
SCHEDULE_CASES = [("linear", 1.0), ("cosine", 1.0), ("poly", 2.0), ("poly", 0.5)]


# ---------------------------------------------------------------- float64 NumPy reference


def ref_alpha_dalpha(name, p, t):
  t = np.asarray(t, np.float64)
  if name == "linear":
    return 1.0 - t, -np.ones_like(t)
  if name == "cosine":
    return np.cos(np.pi / 2 * t), -np.pi / 2 * np.sin(np.pi / 2 * t)
  return 1.0 - t**p, -p * t ** (p - 1.0)


def ref_weight(name, p, t):
  a, da = ref_alpha_dalpha(name, p, t)
  return -da / (1.0 - a)


def ref_nelbo_sum(logits, tokens, masked, t, name, p, loss_mask):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  w = ref_weight(name, p, t)[:, None]
  return float(np.sum(w * nll * (masked & loss_mask)))


def random_batch(seed, b=6, l=9, v=11):
  rs = np.random.RandomState(seed)
  logits = (3.0 * rs.randn(b, l, v)).astype(np.float32)
  tokens = rs.randint(0, v, (b, l)).astype(np.int32)
  masked = rs.rand(b, l) < 0.5
  loss_mask = rs.rand(b, l) < 0.8
  t = rs.uniform(EPS, 1.0, b).astype(np.float32)
  t[0], t[1] = EPS, 1.0  # the two ends of the time range
  return logits, tokens, masked, loss_mask, t


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("name,p", SCHEDULE_CASES)
def test_schedule_matches_closed_form_and_endpoints(name, p):
  s = Schedule(name, exponent=p, eps=EPS)
  t = np.linspace(EPS, 1.0, 101)
  a_ref, da_ref = ref_alpha_dalpha(name, p, t)
  np.testing.assert_allclose(s.alpha(t), np.clip(a_ref, 0, 1), atol=1e-6)
  np.testing.assert_allclose(s.dalpha(t), da_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.mask_prob(t), 1.0 - a_ref, rtol=1e-5, atol=1e-7)
  assert float(s.alpha(0.0)) == 1.0 and abs(float(s.alpha(1.0))) < 1e-6


@pytest.mark.parametrize("name,p", SCHEDULE_CASES)
def test_dalpha_matches_finite_differences(name, p):
  s = Schedule(name, exponent=p, eps=EPS)
  t = np.linspace(0.05, 0.95, 19)
  h = 1e-3
  # float32 central differences: truncation O(h^2), rounding ~1e-7 / h -> rtol 1e-3 is ample.
  fd = (np.asarray(s.alpha(t + h), np.float64) - np.asarray(s.alpha(t - h), np.float64)) / (2 * h)
  np.testing.assert_allclose(s.dalpha(t), fd, rtol=1e-3, atol=1e-4)
  # and against autodiff of alpha, which has no truncation error.
  np.testing.assert_allclose(s.dalpha(t), jax.vmap(jax.grad(s.alpha))(jnp.asarray(t, jnp.float32)),
                             rtol=1e-5)


@pytest.mark.parametrize("name,p", SCHEDULE_CASES)
def test_weight_positive_finite_and_clamped(name, p):
  s = Schedule(name, exponent=p, eps=EPS)
  t = np.concatenate([[EPS], np.geomspace(EPS, 1.0, 200), [1.0]])
  w = np.asarray(s.weight(t))
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  # rtol 1e-5 needs the cancellation-free 1 - alpha: 1 - (1 - t) in float32 is off by ~6e-5 at eps.
  np.testing.assert_allclose(w, ref_weight(name, p, t), rtol=1e-5)
  # t below eps (e.g. 0) is clamped to eps, not inf/nan.
  np.testing.assert_allclose(s.weight(0.0), s.weight(EPS), rtol=1e-6)


def test_make_schedule_from_dict_and_configdict():
  ml_collections = pytest.importorskip("ml_collections")
  s = make_schedule({"schedule": "poly", "exponent": 2.0, "eps": 1e-4, "sampler": "ignored"})
  assert s == Schedule("poly", 2.0, 1e-4)
  cd = ml_collections.ConfigDict({"schedule": "cosine", "exponent": 1.0, "eps": 1e-3})
  assert make_schedule(cd) == Schedule("cosine", 1.0, 1e-3)
  with pytest.raises(ValueError, match="diffusion.schedule"):
    make_schedule({"schedule": "loglinear", "exponent": 1.0, "eps": 1e-3})
  with pytest.raises(ValueError, match="diffusion.eps"):
    make_schedule({"schedule": "linear", "eps": 0.0})
  with pytest.raises(ValueError, match="diffusion.exponent"):
    make_schedule({"schedule": "poly", "exponent": -1.0})


# ---------------------------------------------------------------- time sampling


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_antithetic_times_are_stratified(batch_size):
  t32 = sample_times(jax.random.PRNGKey(3), batch_size, eps=EPS)
  assert t32.shape == (batch_size,) and t32.dtype == jnp.float32
  t = np.asarray(t32, np.float64)
  assert np.all(t >= EPS) and np.all(t <= 1.0)
  # Undo the affine map to [eps, 1]; then t_i = (u + i/B) mod 1: consecutive differences are 1/B
  # modulo 1 (the one wrap-around gives 1/B - 1).
  s = (t - EPS) / (1.0 - EPS)
  d = np.mod(np.diff(s), 1.0)
  np.testing.assert_allclose(d, 1.0 / batch_size, atol=1e-5)
  # sorted, the points are exactly one per stratum of width 1/B.
  np.testing.assert_array_equal(np.floor(np.sort(s) * batch_size), np.arange(batch_size))


def test_times_mean_close_to_uniform():
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  t = np.asarray(jax.vmap(lambda k: sample_times(k, 16, eps=EPS))(keys))
  mean = (1.0 + EPS) / 2
  # Antithetic: every batch mean is within half a stratum (1/(2B)) of the uniform mean.
  assert np.all(np.abs(t.mean(1) - mean) <= 0.5 / 16 + 1e-6)
  # Marginally uniform: 3200 draws, std of the mean ~0.29/sqrt(200 batches) -> 5 sigma = 0.1
  # is generous but catches a shifted map; quartiles checked loosely too.
  assert abs(t.mean() - mean) < 0.01
  np.testing.assert_allclose(np.quantile(t, [0.25, 0.5, 0.75]), [0.25, 0.5, 0.75], atol=0.03)
  iid = np.asarray(sample_times(jax.random.PRNGKey(1), 4000, antithetic=False, eps=EPS))
  assert iid.min() >= EPS and iid.max() <= 1.0
  assert abs(iid.mean() - mean) < 5 * 0.29 / math.sqrt(4000)


# ---------------------------------------------------------------- masking


def test_mask_tokens_rate_and_fixed_positions():
  b, l, v = 4, 4096, 50
  rng_tok, rng_fix, rng_mask = jax.random.split(jax.random.PRNGKey(0), 3)
  tokens = jax.random.randint(rng_tok, (b, l), 0, v)
  fixed = jax.random.bernoulli(rng_fix, 0.3, (b, l))
  alpha = jnp.array([0.0, 0.25, 0.7, 1.0])
  x_t, masked = mask_fn(rng_mask, tokens, alpha, v, fixed)
  x_t, masked, tokens, fixed = map(np.asarray, (x_t, masked, tokens, fixed))
  assert masked.dtype == bool and x_t.dtype == tokens.dtype
  assert not np.any(masked & fixed), "a fixed position was masked"
  np.testing.assert_array_equal(x_t, np.where(masked, v, tokens))
  free = ~fixed
  rate = (masked & free).sum(1) / free.sum(1)
  # Binomial with n ~ 2870 free positions: std <= 0.5/sqrt(n) < 0.0094; tolerance = 4.5 std.
  np.testing.assert_allclose(rate, 1.0 - np.asarray(alpha), atol=0.042)
  assert rate[0] == 1.0 and rate[3] == 0.0  # alpha = 0 masks every free position, alpha = 1 none


def test_alpha_one_masks_nothing_and_loss_is_zero():
  tokens = jnp.arange(24).reshape(3, 8) % 5
  x_t, masked = mask_fn(jax.random.PRNGKey(1), tokens, jnp.ones(3), 5)
  assert not np.any(np.asarray(masked))
  np.testing.assert_array_equal(x_t, tokens)
  logits = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 5))
  out = loss_fn(logits, tokens, masked, jnp.full((3,), 0.5), Schedule("linear"))
  assert float(out["loss"]) == 0.0 and float(out["nelbo_sum"]) == 0.0
  assert float(out["masked_fraction"]) == 0.0 and float(out["num_tokens"]) == 24


# ---------------------------------------------------------------- NELBO


@pytest.mark.parametrize("name,p", SCHEDULE_CASES)
def test_nelbo_matches_numpy_reference(name, p):
  s = Schedule(name, exponent=p, eps=EPS)
  for seed in range(3):
    logits, tokens, masked, loss_mask, t = random_batch(seed)
    out = loss_fn(logits, tokens, masked, t, s, loss_mask)
    ref = ref_nelbo_sum(logits, tokens, masked, t, name, p, loss_mask)
    n = loss_mask.sum()
    np.testing.assert_allclose(out["nelbo_sum"], ref, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], ref / n, rtol=1e-5)
    assert float(out["num_tokens"]) == n
    np.testing.assert_allclose(out["masked_fraction"], (masked & loss_mask).sum() / n, rtol=1e-6)
  # loss_mask defaults to all ones: normaliser = B * L.
  out = loss_fn(logits, tokens, masked, t, s)
  ref = ref_nelbo_sum(logits, tokens, masked, t, name, p, np.ones_like(masked))
  np.testing.assert_allclose(out["loss"], ref / masked.size, rtol=1e-5)


def test_bf16_logits_use_float32_log_softmax():
  logits, tokens, masked, loss_mask, t = random_batch(7, v=257)
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  out = loss_fn(logits_bf16, tokens, masked, t, Schedule("linear"), loss_mask)
  assert out["loss"].dtype == jnp.float32
  # Reference on exactly the bf16 values: a bf16 log-softmax would be off by ~1e-2 relative.
  ref = ref_nelbo_sum(np.asarray(logits_bf16.astype(jnp.float32)), tokens, masked, t, "linear", 1.0,
                      loss_mask)
  np.testing.assert_allclose(out["nelbo_sum"], ref, rtol=1e-5)


def test_unmasked_input_zero_loss_and_finite_at_time_ends():
  logits, tokens, _, _, _ = random_batch(1, b=2)
  s = Schedule("cosine", eps=EPS)
  none = np.zeros(tokens.shape, bool)
  # Unscored positions may hold the mask id (V) as a target; it must not leak NaN into the loss.
  tokens_with_mask_id = tokens.copy()
  tokens_with_mask_id[0, 0] = logits.shape[-1]
  out = loss_fn(logits, tokens_with_mask_id, none, jnp.array([EPS, 1.0]), s)
  assert float(out["loss"]) == 0.0
  all_masked = np.ones(tokens.shape, bool)
  for t in ([EPS, EPS], [1.0, 1.0], [0.0, 0.0]):
    loss = float(loss_fn(logits, tokens, all_masked, jnp.array(t), s)["loss"])
    assert math.isfinite(loss) and loss > 0
  # ... nor into the gradient (row 1 is scored, the mask-id target sits in unscored row 0).
  row1 = none.copy()
  row1[1] = True
  grads = jax.grad(lambda z: loss_fn(z, tokens_with_mask_id, row1, jnp.array([EPS, 1.0]),
                                            s)["loss"])(logits)
  assert np.all(np.isfinite(grads)) and np.any(grads[1] != 0) and np.all(grads[0] == 0)


def test_out_of_range_target_at_scored_position_is_nan():
  logits, tokens, _, _, t = random_batch(2)
  bad = tokens.copy()
  bad[0, 0] = logits.shape[-1]  # the mask id is not an output class
  masked = np.zeros(tokens.shape, bool)
  masked[0, 0] = True
  assert math.isnan(float(loss_fn(logits, bad, masked, t, Schedule("linear"))["loss"]))


def test_loss_gradient_is_softmax_minus_onehot():
  logits, tokens, masked, loss_mask, t = random_batch(4)
  s = Schedule("linear", eps=EPS)
  g = jax.grad(lambda z: loss_fn(z, tokens, masked, t, s, loss_mask)["loss"])(logits)
  x = logits.astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(logits.shape[-1])[tokens]
  coef = ref_weight("linear", 1.0, t)[:, None] * (masked & loss_mask) / loss_mask.sum()
  np.testing.assert_allclose(g, coef[..., None] * (p - onehot), rtol=1e-4, atol=1e-6)


def test_metrics_from_nelbo():
  m = metrics_from_nelbo(jnp.float32(300.0), jnp.float32(120.0))
  nats = 300.0 / 120.0
  np.testing.assert_allclose(m["nats_per_token"], nats, rtol=1e-6)
  np.testing.assert_allclose(m["bits_per_token"], nats / math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(m["ppl_bound"], math.exp(nats), rtol=1e-6)
  assert float(metrics_from_nelbo(0.0, 0.0)["nats_per_token"]) == 0.0  # no tokens: no NaN


# ---------------------------------------------------------------- held-out grid


def test_eval_time_grid_midpoints():
  g = np.asarray(eval_time_grid(4, 0.2))
  np.testing.assert_allclose(g, [0.3, 0.5, 0.7, 0.9], rtol=1e-6)


def test_nelbo_on_grid_matches_loop_and_uniform_predictor_gives_log_v():
  b, l, v, k = 16, 256, 7, 16
  s = Schedule("linear", eps=EPS)
  rng = jax.random.PRNGKey(5)
  tokens = jax.random.randint(jax.random.PRNGKey(6), (b, l), 0, v)
  fixed = jnp.zeros((b, l), bool).at[:, :8].set(True)  # a prompt
  loss_mask = ~fixed
  grid = eval_time_grid(k, EPS)
  w_logits = jax.random.normal(jax.random.PRNGKey(7), (v,))
  logits_fn = lambda x_t, t_B: jnp.broadcast_to(w_logits, x_t.shape + (v,)) * t_B[:, None, None]

  out = jax.jit(lambda r: nelbo_on_grid(logits_fn, r, tokens, s, v, grid, fixed, loss_mask))(rng)

  @jax.jit
  def one_point(i, t):
    t_B = jnp.full((b,), t)
    x_t, masked = mask_fn(jax.random.fold_in(rng, i), tokens, s.alpha(t_B), v, fixed)
    return loss_fn(logits_fn(x_t, t_B), tokens, masked, t_B, s, loss_mask)["nelbo_sum"]

  sums = [one_point(i, t) for i, t in enumerate(np.asarray(grid))]
  np.testing.assert_allclose(out["nelbo_sum"], np.mean(sums), rtol=1e-5)
  assert float(out["num_tokens"]) == b * (l - 8)

  # A uniform predictor pays log V per masked token; integrating weight * (1 - alpha) = -alpha'
  # over t gives exactly log V nats per token: the NELBO is a proper likelihood bound. The
  # masking noise is ~1% here (binomial counts, 3840 tokens); tolerance 4%.
  uniform = jax.jit(lambda r: nelbo_on_grid(lambda x_t, t_B: jnp.zeros(x_t.shape + (v,)), r,
                                             tokens, s, v, grid, fixed, loss_mask))(rng)
  np.testing.assert_allclose(uniform["loss"], math.log(v), rtol=0.04)
