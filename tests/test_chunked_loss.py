"""The training loss built a chunk of positions at a time equals the whole-logits loss.

The head's logits and log-softmax are computed `model.loss_chunk` positions at a time and
rematerialised in the backward (`chunked_token_nll`): the loss and every gradient must equal
those of today's path (logits B x L x V, then `diffusion_loss`) in float32 to rtol 1e-6, padded
vocabulary columns must carry no probability, and no B x L x V array may appear in the
differentiated program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.diffusion import (chunked_token_nll, diffusion_loss, make_schedule, mask_tokens,
                               nelbo_terms, token_nll)
from loopjax.model import LoopedTransformer, ModelConfig
from loopjax.model.config import MASKED_LOGIT

B, L, D, V, PADDED = 3, 16, 8, 13, 16
RTOL = 1e-6


def assert_grads_close(got, want):
  """rtol 1e-6, with an absolute floor of 1e-6 of the largest entry: a weight gradient summed
  over the chunks adds the same per-position terms in another order, so entries that cancel
  to near zero differ by the float32 rounding of the large terms."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(np.abs(want).max(), 1e-30))


def _head(seed=0):
  r = np.random.default_rng(seed)
  h = r.normal(size=(B, L, D)).astype(np.float32)
  w = r.normal(size=(D, PADDED)).astype(np.float32)
  b = r.normal(size=(PADDED,)).astype(np.float32)
  tokens = r.integers(0, V, size=(B, L)).astype(np.int32)
  return h, w, b, tokens


def _logits_fn(w, b):
  def fn(h):
    logits = jnp.einsum("bld,dv->blv", h, w) + b
    return jnp.where(jnp.arange(PADDED) < V, logits, MASKED_LOGIT)
  return fn


def _shapes(jaxpr):
  """Shapes of every value an (inner or outer) equation of a jaxpr produces."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
      out += _shapes(sub)
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", p)
      if hasattr(inner, "eqns"):
        out += _shapes(inner)
  return out


@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_nll_equals_whole_and_float64(chunk):
  h, w, b, tokens = _head()
  whole = token_nll(_logits_fn(w, b)(h), tokens)
  chunked = chunked_token_nll(_logits_fn(w, b), h, tokens, chunk)
  np.testing.assert_allclose(chunked, whole, rtol=RTOL)
  # Independent float64 reference over the real columns only (padded ones carry nothing).
  logits = np.einsum("bld,dv->blv", h.astype(np.float64), w.astype(np.float64))[..., :V] + b[:V]
  ref = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1) \
      - np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(chunked, ref, rtol=1e-5)


def test_chunked_gradients_equal_whole_and_no_BxLxV():
  h, w, b, tokens = _head(1)
  weight = np.random.default_rng(2).uniform(0.5, 2.0, size=(B, L)).astype(np.float32)

  def loss(chunk):
    def fn(h, w, b):
      return (weight * chunked_token_nll(_logits_fn(w, b), h, tokens, chunk)).sum()
    return fn

  whole = jax.grad(loss(0), argnums=(0, 1, 2))(h, w, b)
  chunked = jax.grad(loss(4), argnums=(0, 1, 2))(h, w, b)
  for g_whole, g_chunked in zip(whole, chunked):
    assert_grads_close(g_chunked, g_whole)
  np.testing.assert_allclose(chunked[1][:, V:], 0.0)  # padded columns: no gradient either
  # Not one B x L x V value anywhere in the differentiated chunked program; the whole one has.
  full = (B, L, PADDED)
  assert full in _shapes(jax.make_jaxpr(jax.grad(loss(0)))(h, w, b).jaxpr)
  assert full not in _shapes(jax.make_jaxpr(jax.grad(loss(4)))(h, w, b).jaxpr)


def test_out_of_range_target_is_nan_where_scored_only():
  h, w, b, tokens = _head(3)
  tokens = tokens.copy()
  tokens[0, 5] = PADDED + 3  # beyond every column: a bug in the data, never clamped
  nll = chunked_token_nll(_logits_fn(w, b), h, tokens, 4)
  assert np.isnan(nll[0, 5]) and np.isfinite(np.delete(np.asarray(nll).ravel(), 5)).all()
  schedule = make_schedule({"schedule": "linear"})
  masked = np.zeros((B, L), bool)
  t = jnp.full((B,), 0.5)
  assert np.isfinite(nelbo_terms(nll, masked, t, schedule)["loss"])
  masked[0, 5] = True
  assert np.isnan(nelbo_terms(nll, masked, t, schedule)["loss"])


@pytest.mark.parametrize("dtype", ["float32"])
def test_model_loss_and_gradients_equal_whole_logits_path(dtype):
  """Today's path (logits, then diffusion_loss) and the model's chunked NLLs: same loss, same
  gradient of every parameter, with a padded vocabulary and a looped block."""
  base = dict(vocab_size=V, vocab_multiple=8, max_length=L, width=16, num_layers=3, num_heads=2,
              cond_dim=8, loop_start=1, loop_end=2, max_loops=3, dtype=dtype,
              time_conditioning=True, zero_init_head=False)
  cfg = ModelConfig(kernels="reference", **base, loss_chunk=4)
  assert cfg.padded_vocab == PADDED
  model = LoopedTransformer(cfg)
  r = jax.random.PRNGKey(0)
  tokens = jax.random.randint(r, (B, L), 0, V)
  t = jax.random.uniform(jax.random.PRNGKey(1), (B,), minval=0.1, maxval=0.9)
  schedule = make_schedule({"schedule": "linear"})
  x_t, masked = mask_tokens(jax.random.PRNGKey(2), tokens, schedule.alpha(t), cfg.mask_id)
  params = model.init(r, x_t, 2, t)["params"]

  def today(p):
    logits = LoopedTransformer(ModelConfig(kernels="reference",
                                           **base, loss_chunk=0)).apply({"params": p}, x_t, 2, t)
    return diffusion_loss(logits, tokens, masked, t, schedule)["loss"]

  def chunked(p):
    nll = model.apply({"params": p}, x_t, 2, t, targets_BxL=tokens)
    return nelbo_terms(nll, masked, t, schedule)["loss"]

  (l0, g0) = jax.jit(jax.value_and_grad(today))(params)
  (l1, g1) = jax.jit(jax.value_and_grad(chunked))(params)
  np.testing.assert_allclose(l1, l0, rtol=RTOL)
  assert float(l0) > 0
  jax.tree_util.tree_map(lambda a, c: assert_grads_close(c, a), g0, g1)
  # The padded columns' logits are MASKED_LOGIT: softmax puts exactly zero on them.
  logits = model.apply({"params": params}, x_t, 2, t)
  assert np.all(np.asarray(jax.nn.softmax(logits, -1))[..., V:] == 0.0)
