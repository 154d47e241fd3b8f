"""Kernels arranged for XLA:CPU: the reference math with hand-written backward passes.

XLA:CPU's fast GEMM path (YNNPACK) wants a row-major left operand contracted on its last axis;
a transposed left operand runs on a slower path, and XLA folds explicit transposes back into a
dot unless an optimization barrier stands in between. The ops below therefore materialise the
transposes their backward passes need, keep bfloat16 operands bfloat16 and accumulate in
float32, save one copy of a projection input shared by several weights, and keep one
B x H x L x L residual per attention layer. Same FLOPs as autodiff; `benchmarks/` measures them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _barrier(x):
  """Keeps XLA from rewriting across this point (see _materialized_transpose)."""
  return jax.lax.optimization_barrier(x)


def _materialized_transpose(x, perm):
  """x.transpose(perm) as a real copy: XLA would otherwise fold the transpose back into the
  following dot as a transposed left operand, which XLA:CPU runs on a slow (non-YNNPACK) path,
  for a copy that costs far less. The barrier before the transpose makes it a plain copy of
  the materialised x: fused with x's producer, XLA recomputes that producer in transposed
  order."""
  return _barrier(_barrier(x).transpose(perm))


def _pin(*xs):
  """Low-precision matmul operands, pinned: with XLA's default excess-precision rewrites a
  float32 -> bfloat16 -> float32 round trip is dropped, and the dot then runs in float32."""
  if all(x.dtype == jnp.float32 for x in xs):
    return xs
  return jax.lax.optimization_barrier(xs)


def _dot(a, b, dims, precision, out_dtype):
  # float32 accumulation, then the result dtype: XLA:CPU runs a bfloat16 x bfloat16 -> float32
  # dot as a real bfloat16 GEMM (avx512_bf16), but upcasts a bfloat16 -> bfloat16 dot to float32.
  a, b = _pin(a, b)
  out = jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmuls(x_NxK, ws_KxM, precision):
  """[x @ w for w in ws] for weights of one shape (one dense layer, or attention's q, k, v),
  with a backward of row-major GEMMs only (see `_weight_grad_mode`) and one saved copy of x."""
  return _projections(x_NxK, ws_KxM, precision)


def _projections(x_NxK, ws_KxM, precision):
  return [_dot(x_NxK, w, ((1,), (0,)), precision, jnp.result_type(x_NxK, w)) for w in ws_KxM]


def _weight_grad_mode(w_KxM) -> str:
  """How dw = x^T g is computed. It contracts N, the leading axis of both x and g; the fast
  GEMM wants the contracted axis last in the left operand, so one operand is transposed:
  "xt": x (N x K) when K <= M, saved already transposed by the forward pass (a fresh array,
  not a slice of the scan's residual stack); "gt": else g (N x M, the smaller), as (g^T x)^T."""
  return "xt" if w_KxM.shape[0] <= w_KxM.shape[1] else "gt"


def _matmuls_fwd(x_NxK, ws_KxM, precision):
  # One weight shape, hence one weight-gradient mode (and one layout of the saved x) for all.
  if len({w.shape for w in ws_KxM}) != 1:
    raise ValueError(f"projections of different shapes {[w.shape for w in ws_KxM]}")
  # Materialised: a plain transpose would be folded into the backward's dot as a transposed left
  # operand (the slow path) whenever no scan stacks the residual in between (unrolled layers).
  xt = _weight_grad_mode(ws_KxM[0]) == "xt"
  x_res = _materialized_transpose(x_NxK, (1, 0)) if xt else x_NxK
  # The dots themselves, not a call of _matmuls: remat policies ("dots") must see dot_generals.
  return _projections(x_NxK, ws_KxM, precision), (x_res, ws_KxM)


def _matmuls_bwd(precision, res, gs_NxM):
  x_res, ws_KxM = res
  dx, dws = None, []
  for w_KxM, g_NxM in zip(ws_KxM, gs_NxM):
    g_NxM = g_NxM.astype(jnp.result_type(x_res, w_KxM))
    # dx = g w^T: an "NT" product, fast as it is; the projections' input gradients add up.
    d_x = _dot(g_NxM, w_KxM, ((1,), (1,)), precision, x_res.dtype)
    dx = d_x if dx is None else dx + d_x
    if _weight_grad_mode(w_KxM) == "xt":
      dw = _dot(x_res, g_NxM, ((1,), (0,)), precision, w_KxM.dtype)
    else:
      dw_t = _dot(_materialized_transpose(g_NxM, (1, 0)), x_res, ((1,), (0,)), precision,
                  w_KxM.dtype)
      # The barrier keeps XLA from folding the transpose into the dot (as swapped, transposed
      # operands: the slow path again).
      dw = _materialized_transpose(_barrier(dw_t), (1, 0))
    dws.append(dw)
  return dx, dws


_matmuls.defvjp(_matmuls_fwd, _matmuls_bwd)


def projections(x_NxK: Array, ws_KxM: list[Array]) -> list[Array]:
  """[x @ w for w in ws] (weights of one shape) as one op that saves x once."""
  return _matmuls(x_NxK, ws_KxM, None)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for dense layers (trailing lhs axes against leading kernel axes, no batch
  axes) as one 2-D matmul whose gradients are row-major GEMMs (see `_matmuls_bwd`); any other
  contraction goes to `lax.dot_general` unchanged. Same math and the same matmul count."""
  (lc, rc), (lb, rb) = dimension_numbers
  n = len(lc)
  if (lb or rb or preferred_element_type is not None or n == 0
      or tuple(lc) != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rc) != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  k = math.prod(rhs.shape[:n])
  out = _matmuls(lhs.reshape(-1, k), [rhs.reshape(k, -1)], precision)[0]
  return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


@jax.custom_vjp
def add_bias(y_NxM: Array, b_M: Array) -> Array:
  """y + b, with the bias gradient 1^T g as a float32-accumulating GEMM."""
  return y_NxM + b_M.astype(y_NxM.dtype)


def _add_bias_fwd(y_NxM, b_M):
  return add_bias(y_NxM, b_M), jnp.zeros((0,), b_M.dtype)  # carries b's dtype


def _add_bias_bwd(b_like, g_NxM):
  # A bfloat16 reduction over N makes XLA:CPU copy g to float32 and run a tree reduction
  # instead of a GEMM.
  g = g_NxM.reshape(-1, g_NxM.shape[-1])
  db = _dot(jnp.ones((1, g.shape[0]), g.dtype), g, ((1,), (0,)), None, jnp.float32)[0]
  return g_NxM, db.astype(b_like.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def eigen_forms(dt) -> bool:
  """Whether attention's batched products take the float32 forms below. XLA:CPU gives a dot to
  YNNPACK when its left operand is contracted on its last axis, to Eigen otherwise; for float32
  attention's small per-head products (L x L x K) Eigen's batched GEMM is the faster, so four of
  the six products are written with the contracted axis leading in the left operand
  (materialised, so XLA cannot fold the transposes back). YNNPACK wins for bfloat16, which keeps
  the row-major forms. Measured by benchmarks/attention_forms.py."""
  return dt == jnp.float32


def bdot(spec, a_BxHx2, b_BxHx2, eigen: bool):
  """einsum(spec, a, b) over B x H x . x . operands ("bh.., bh..->bh.."), accumulating in
  float32; with `eigen`, both operands materialised. The B and H axes are merged first: a
  transposed operand feeding a 4-D batched dot makes XLA:CPU run a bfloat16 dot in float32 (it
  upcasts both operands); the reshape makes the transpose a real copy, and the dot stays bf16."""
  bh = a_BxHx2.shape[:2]
  a, b = (x.reshape((-1,) + x.shape[2:]) for x in (a_BxHx2, b_BxHx2))
  if eigen:
    a, b = jax.lax.optimization_barrier((a, b))
  out = jnp.einsum(spec.replace("h", ""), *_pin(a, b), preferred_element_type=jnp.float32)
  return out.reshape(bh + out.shape[1:])


def _attend_fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL):
  dt = q_BxLxHxK.dtype
  eigen = eigen_forms(dt)
  scale = 1.0 / math.sqrt(q_BxLxHxK.shape[-1])
  # Heads-major layout for the batched matmuls; the 1/sqrt(K) scale rides on q (L*K, not L*L).
  q = (q_BxLxHxK.astype(jnp.float32) * scale).astype(dt).transpose(0, 2, 1, 3)
  k = k_BxLxHxK.transpose(0, 2, 1, 3)
  v = v_BxLxHxK.transpose(0, 2, 1, 3)
  if eigen:  # s = (q^T)^T k: q^T contracted on its leading K axis
    s_BxHxLxL = bdot("bhkq,bhtk->bhqt", q.transpose(0, 1, 3, 2), k, True)
  else:
    s_BxHxLxL = bdot("bhqk,bhtk->bhqt", q, k, False)
  # Scaled-by-q dot products in float32, -1e30 where attention is not allowed.
  s_BxHxLxL = jnp.where(mask_Bx1xLxL, s_BxHxLxL, -1e30)
  # Unnormalised probabilities e = exp(s - max) and 1/sum(e): the normalisation is applied to
  # the L x K output (and in the backward pass) instead of a pass over B x H x L x L.
  e_BxHxLxL = jnp.exp(s_BxHxLxL - s_BxHxLxL.max(axis=-1, keepdims=True)).astype(dt)
  inv_BxHxL = 1.0 / e_BxHxLxL.astype(jnp.float32).sum(axis=-1)
  o_BxHxLxK = bdot("bhqt,bhtk->bhqk", e_BxHxLxL, v, False)
  o_BxLxHxK = (o_BxHxLxK * inv_BxHxL[..., None]).astype(dt).transpose(0, 2, 1, 3)
  return o_BxLxHxK, (q, k, v, e_BxHxLxL, inv_BxHxL, o_BxLxHxK, mask_Bx1xLxL)


@jax.custom_vjp
def attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL):
  """softmax(q k^T / sqrt(K), masked) v for B x L x H x K inputs; returns B x L x H x K.

  The reference math with a hand-written backward pass that keeps one B x H x L x L residual
  per layer (the exponentials) instead of the two that autodiff of `jax.nn.softmax` stores, and
  no extra pass over B x H x L x L for the normalisation. The matmul count is autodiff's
  (2 forward, 4 backward): nothing is recomputed. Softmax statistics are float32; matmuls take
  the input dtype and accumulate in float32.
  """
  return _attend_fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL)[0]


def _attend_bwd(res, do_BxLxHxK):
  q, k, v, e_BxHxLxL, inv_BxHxL, o_BxLxHxK, mask = res
  dt = q.dtype
  eigen = eigen_forms(dt)
  scale = 1.0 / math.sqrt(q.shape[-1])
  f32 = jnp.float32
  do_BxHxLxK = do_BxLxHxK.astype(f32).transpose(0, 2, 1, 3)
  # dv = p^T do with p = e / sum(e): 1/sum scales do's rows.
  do_scaled_BxHxLxK = (do_BxHxLxK * inv_BxHxL[..., None]).astype(dt)
  if eigen:  # dv^T = do_scaled^T e and dp = (do^T)^T v^T: left operands contracted on axis 2
    dv_BxHxKxL = bdot("bhqk,bhqt->bhkt", do_scaled_BxHxLxK, e_BxHxLxL, True)
    dp_BxHxLxL = bdot("bhkq,bhtk->bhqt", do_BxLxHxK.astype(dt).transpose(0, 2, 3, 1), v, True)
  else:
    # Row-major "NN"/"NT" products only: the transposes are done explicitly on the small
    # L x K arrays, never on the L x L ones.
    dv_BxHxKxL = bdot("bhkq,bhqt->bhkt",
                      _materialized_transpose(do_scaled_BxHxLxK, (0, 1, 3, 2)), e_BxHxLxL, False)
    dp_BxHxLxL = bdot("bhqk,bhtk->bhqt", do_BxHxLxK.astype(dt), v, False)
  # Softmax backward: ds = p * (dp - sum_t p dp), and sum_t p dp = sum_k do * o.
  delta_BxHxL = (do_BxLxHxK.astype(f32) * o_BxLxHxK.astype(f32)).sum(-1).transpose(0, 2, 1)
  ds_BxHxLxL = (e_BxHxLxL.astype(f32) * inv_BxHxL[..., None]
                * (dp_BxHxLxL - delta_BxHxL[..., None])).astype(dt)
  dq_BxHxLxK = bdot("bhqt,bhtk->bhqk", ds_BxHxLxL, k, False)
  if eigen:  # dk^T = q^T ds: q contracted on its axis 2
    dk_BxHxKxL = bdot("bhqk,bhqt->bhkt", q, ds_BxHxLxL, True)
  else:
    dk_BxHxKxL = bdot("bhkq,bhqt->bhkt", _materialized_transpose(q, (0, 1, 3, 2)), ds_BxHxLxL,
                      False)
  dk = dk_BxHxKxL.transpose(0, 3, 1, 2)
  dq = (dq_BxHxLxK * scale).transpose(0, 2, 1, 3)
  dv = dv_BxHxKxL.transpose(0, 3, 1, 2)
  return dq.astype(dt), dk.astype(dt), dv.astype(dt), None


attention.defvjp(_attend_fwd, _attend_bwd)
