"""The performance rewrites of the model (issue 8) against plain autodiff.

`attend` (attention with a hand-written backward pass) and `dense_dot_general` (dense layers
whose gradients are arranged for XLA:CPU's fast GEMM path, three ways of forming x^T g) must give
autodiff's values and gradients; the matmul counts are checked by tests/test_flops.py. No timing
here: throughput ratios are measured by benchmarks/ (see BENCHMARKS.md), which a loaded CI host
cannot reproduce reliably.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.model import layers


def _reference_attention(q, k, v, mask):
  logits = jnp.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
  return jnp.einsum("bhqt,bthk->bqhk", probs, v)


@pytest.mark.parametrize("eigen_forms", [True, False], ids=["eigen_forms", "row_major_forms"])
def test_attention_custom_vjp_matches_autodiff(eigen_forms, monkeypatch):
  # Both arrangements of the batched products (float32 CPU, and bfloat16/GPU/TPU).
  monkeypatch.setattr(layers, "_eigen_forms", lambda dt: eigen_forms)
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(0), 4)
  b, length, h, d = 2, 12, 3, 8
  q, k, v = (jax.random.normal(key, (b, length, h, d)) for key in (kq, kk, kv))
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
  eye = jnp.eye(length, dtype=bool)
  mask = (((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)) | eye)[:, None]
  w = jax.random.normal(kw, (b, length, h, d))
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)) * w)
  np.testing.assert_allclose(layers.attend(q, k, v, mask), _reference_attention(q, k, v, mask),
                             rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(layers.attend), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(_reference_attention), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=f"d/d{name}")


@pytest.mark.parametrize("n,kdim,m", [(10, 6, 12), (10, 12, 6), (6, 6, 6), (12, 12, 6),
                                      (6, 6, 12)],
                         ids=["x_transposed", "g_transposed", "square", "n_eq_k_gt_m",
                              "n_eq_k_lt_m"])
def test_dense_dot_general_matches_autodiff(n, kdim, m):
  # Covers each weight-gradient mode, including N == K where a shape test could not tell x
  # from x^T.
  x = jax.random.normal(jax.random.PRNGKey(1), (1, n, kdim))  # N = n rows
  w = jax.random.normal(jax.random.PRNGKey(2), (kdim, m // 2, 2))
  dims = (((2,), (0,)), ((), ()))
  ours = lambda x, w: jnp.sum(jnp.sin(layers.dense_dot_general(x, w, dims)))
  plain = lambda x, w: jnp.sum(jnp.sin(jax.lax.dot_general(x, w, dims)))
  np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-5)
  for g, r in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,kdim,m", [(10, 6, 12), (10, 12, 6), (6, 6, 6)],
                         ids=["x_transposed", "g_transposed", "square"])
def test_shared_input_projections_match_autodiff(n, kdim, m):
  # Attention's q, k, v: three projections of one input with one saved copy of it.
  x = jax.random.normal(jax.random.PRNGKey(1), (n, kdim))
  ws = [jax.random.normal(jax.random.PRNGKey(i), (kdim, m)) for i in (2, 3, 4)]
  loss = lambda outs: sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs))
  ours = lambda x, ws: loss(layers._matmuls(x, ws, None))
  plain = lambda x, ws: loss([x @ w for w in ws])
  np.testing.assert_allclose(ours(x, ws), plain(x, ws), rtol=1e-5)
  got, want = jax.jit(jax.grad(ours, (0, 1)))(x, ws), jax.grad(plain, (0, 1))(x, ws)
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_bfloat16_dense_keeps_dtypes():
  x = jnp.ones((4, 8), jnp.bfloat16)
  w = jnp.ones((8, 3), jnp.bfloat16)
  dims = (((1,), (0,)), ((), ()))
  y = layers.dense_dot_general(x, w, dims)
  assert y.dtype == jnp.bfloat16
  gx, gw = jax.grad(lambda x, w: layers.dense_dot_general(x, w, dims).astype(jnp.float32).sum(),
                    (0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gw, np.float32), 4.0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 0.02)])
def test_dense_matches_flax_dense(dtype, tol):
  # Same parameters and init as nn.Dense; the bias gradient is a GEMM (f32-accumulated in bf16).
  import flax.linen as nn
  kw = dict(dtype=dtype, kernel_init=layers.dense_init(("embed", "mlp")))
  ours, flax_dense = layers.Dense(24, **kw), nn.Dense(24, **kw)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 16))
  p, q = nn.unbox(ours.init(jax.random.PRNGKey(0), x)), nn.unbox(flax_dense.init(
      jax.random.PRNGKey(0), x))
  jax.tree_util.tree_map(np.testing.assert_array_equal, p, q)
  p = jax.tree_util.tree_map(lambda t: t + 0.1, p)  # a non-zero bias
  grad = lambda m: jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32))))(p)
  for g, r in zip(jax.tree_util.tree_leaves(grad(ours)), jax.tree_util.tree_leaves(grad(flax_dense))):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=tol, atol=tol * 8)


def test_bfloat16_attention_dots_stay_bfloat16():
  # A transposed operand feeding a 4-D batched dot made XLA:CPU upcast bfloat16 attention dots to
  # float32 (5 of 6 ran at float32 speed); `_bdot` merges the batch axes to prevent it.
  q, k, v = (jnp.ones((2, 16, 2, 8), jnp.bfloat16) for _ in range(3))
  mask = jnp.ones((2, 1, 16, 16), bool)
  loss = lambda q, k, v: jnp.sum(layers.attend(q, k, v, mask).astype(jnp.float32))
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile().as_text()
  shapes = dict(re.findall(r"%(\S+) = (\S+) ", hlo))
  operands = re.findall(r"= \S+ dot\(%(\S+), %(\S+)\)", hlo)
  assert len(operands) == 6, hlo
  for a, b in operands:
    assert shapes[a].startswith("bf16") and shapes[b].startswith("bf16"), (shapes[a], shapes[b])
