"""Transformer pieces of the MDLM-style denoiser: RoPE, attention, MLP, adaLN block.

Every parameter carries logical axis names (see loopjax/parallel) so one rules table decides how
it is sharded. Compute happens in `cfg.dtype`; parameters are float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from loopjax.model.config import ModelConfig

Array = jax.Array


def compute_dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def dense_init(axes, scale: float = 1.0):
  return nn.with_logical_partitioning(nn.initializers.variance_scaling(scale, "fan_in", "normal"),
                                      axes)


@functools.lru_cache(maxsize=64)
def _rope_tables(length: int, k: int, base: float):
  """cos and sin of the rotation angles, L x K/2 float32, as NumPy constants: computed inside
  the graph, XLA fuses them into every consumer and evaluates two transcendentals per element
  of each B x L x H x K array (forward and backward), which cost ~4 % of a CPU train step."""
  inv_freq_K2 = 1.0 / (base ** (np.arange(0, k, 2, dtype=np.float64) / k))
  ang_LxK2 = np.arange(length, dtype=np.float64)[:, None] * inv_freq_K2[None, :]
  return np.cos(ang_LxK2).astype(np.float32), np.sin(ang_LxK2).astype(np.float32)


def rope(x_BxLxHxK: Array, base: float) -> Array:
  """Rotary position embedding (rotate-half form) over the last axis."""
  _, length, _, k = x_BxLxHxK.shape
  cos_LxK2, sin_LxK2 = _rope_tables(length, k, float(base))
  cos, sin = cos_LxK2[None, :, None, :], sin_LxK2[None, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _materialized_transpose(x, perm):
  """x.transpose(perm), on CPU as a real copy: XLA would otherwise fold the transpose back into
  the following dot as a transposed left operand, which XLA:CPU runs on a slow (non-YNNPACK)
  path, about 3x slower than the row-major GEMM, for a copy that costs far less. GPU/TPU GEMMs
  take transposed operands at full speed, so there the transpose is left to XLA. The barrier
  before the transpose makes it a plain copy of the materialised x: fused with x's producer,
  XLA recomputes that producer in transposed order, about twice as slow."""
  return _barrier(_barrier(x).transpose(perm))


def _barrier(x):
  """On CPU, keeps XLA from rewriting across this point (see _materialized_transpose)."""
  return jax.lax.optimization_barrier(x) if _on_cpu() else x


def _pin(*xs):
  """Low-precision matmul operands, pinned: with XLA's default excess-precision rewrites a
  float32 -> bfloat16 -> float32 round trip is dropped, and the dot then runs in float32."""
  if all(x.dtype == jnp.float32 for x in xs) or not _on_cpu():
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
  """How dw = x^T g is computed. It contracts N, the leading axis of both x and g; XLA:CPU's
  fast GEMM wants the contracted axis last in the left operand, so one operand is transposed:
  "xt": x (N x K) when K <= M, saved already transposed by the forward pass (a fresh array,
  not a slice of the scan's residual stack); "gt": else g (N x M, the smaller), as (g^T x)^T.
  Elsewhere GEMMs take transposed operands at full speed: "tn", plain x^T g."""
  if not _on_cpu():
    return "tn"
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
    mode = _weight_grad_mode(w_KxM)
    if mode == "xt":
      dw = _dot(x_res, g_NxM, ((1,), (0,)), precision, w_KxM.dtype)
    elif mode == "gt":
      dw_t = _dot(_materialized_transpose(g_NxM, (1, 0)), x_res, ((1,), (0,)), precision,
                  w_KxM.dtype)
      # The barrier keeps XLA from folding the transpose into the dot (as swapped, transposed
      # operands: the slow path again).
      dw = _materialized_transpose(_barrier(dw_t), (1, 0))
    else:
      dw = _dot(x_res, g_NxM, ((0,), (0,)), precision, w_KxM.dtype)
    dws.append(dw)
  return dx, dws


_matmuls.defvjp(_matmuls_fwd, _matmuls_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
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


def _eigen_forms(dt) -> bool:
  """Whether attention's batched products take the float32 CPU forms below. XLA:CPU gives a dot
  to YNNPACK when its left operand is contracted on its last axis, to Eigen otherwise; for
  float32 attention's small per-head products (L x L x K, K = 64) Eigen's batched GEMM runs
  1.3-1.6x faster than YNNPACK's, so four of the six products are written with the contracted
  axis leading in the left operand (materialised, so XLA cannot fold the transposes back).
  YNNPACK wins for bfloat16, and GPUs/TPUs take any form: those keep the row-major forms.
  Measured by benchmarks/attention_forms.py."""
  return _on_cpu() and dt == jnp.float32


def _bdot(spec, a_BxHx2, b_BxHx2, eigen: bool):
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
  eigen = _eigen_forms(dt)
  scale = 1.0 / math.sqrt(q_BxLxHxK.shape[-1])
  # Heads-major layout for the batched matmuls; the 1/sqrt(K) scale rides on q (L*K, not L*L).
  q = (q_BxLxHxK.astype(jnp.float32) * scale).astype(dt).transpose(0, 2, 1, 3)
  k = k_BxLxHxK.transpose(0, 2, 1, 3)
  v = v_BxLxHxK.transpose(0, 2, 1, 3)
  if eigen:  # s = (q^T)^T k: q^T contracted on its leading K axis
    s_BxHxLxL = _bdot("bhkq,bhtk->bhqt", q.transpose(0, 1, 3, 2), k, True)
  else:
    s_BxHxLxL = _bdot("bhqk,bhtk->bhqt", q, k, False)
  # Scaled-by-q dot products in float32, -1e30 where attention is not allowed.
  s_BxHxLxL = jnp.where(mask_Bx1xLxL, s_BxHxLxL, -1e30)
  # Unnormalised probabilities e = exp(s - max) and 1/sum(e): the normalisation is applied to
  # the L x K output (and in the backward pass) instead of a pass over B x H x L x L.
  e_BxHxLxL = jnp.exp(s_BxHxLxL - s_BxHxLxL.max(axis=-1, keepdims=True)).astype(dt)
  inv_BxHxL = 1.0 / e_BxHxLxL.astype(jnp.float32).sum(axis=-1)
  o_BxHxLxK = _bdot("bhqt,bhtk->bhqk", e_BxHxLxL, v, False)
  o_BxLxHxK = (o_BxHxLxK * inv_BxHxL[..., None]).astype(dt).transpose(0, 2, 1, 3)
  return o_BxLxHxK, (q, k, v, e_BxHxLxL, inv_BxHxL, o_BxLxHxK, mask_Bx1xLxL)


@jax.custom_vjp
def attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL):
  """softmax(q k^T / sqrt(K), masked) v for B x L x H x K inputs; returns B x L x H x K.

  The same math as the textbook einsum/softmax/einsum, with a hand-written backward pass that
  keeps one B x H x L x L residual per layer (the exponentials) instead of the two that autodiff
  of `jax.nn.softmax` stores, and no extra pass over B x H x L x L for the normalisation. The
  matmul count is the same as autodiff's (2 forward, 4 backward): nothing is recomputed.
  Softmax statistics are float32; matmuls take the input dtype and accumulate in float32.
  """
  return _attend_fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL)[0]


def _attend_bwd(res, do_BxLxHxK):
  q, k, v, e_BxHxLxL, inv_BxHxL, o_BxLxHxK, mask = res
  dt = q.dtype
  eigen = _eigen_forms(dt)
  scale = 1.0 / math.sqrt(q.shape[-1])
  f32 = jnp.float32
  do_BxHxLxK = do_BxLxHxK.astype(f32).transpose(0, 2, 1, 3)
  # dv = p^T do with p = e / sum(e): 1/sum scales do's rows.
  do_scaled_BxHxLxK = (do_BxHxLxK * inv_BxHxL[..., None]).astype(dt)
  if eigen:  # dv^T = do_scaled^T e and dp = (do^T)^T v^T: left operands contracted on axis 2
    dv_BxHxKxL = _bdot("bhqk,bhqt->bhkt", do_scaled_BxHxLxK, e_BxHxLxL, True)
    dp_BxHxLxL = _bdot("bhkq,bhtk->bhqt", do_BxLxHxK.astype(dt).transpose(0, 2, 3, 1), v, True)
  else:
    # Row-major "NN"/"NT" products only: the transposes are done explicitly on the small
    # L x K arrays, never on the L x L ones.
    dv_BxHxKxL = _bdot("bhkq,bhqt->bhkt",
                       _materialized_transpose(do_scaled_BxHxLxK, (0, 1, 3, 2)), e_BxHxLxL, False)
    dp_BxHxLxL = _bdot("bhqk,bhtk->bhqt", do_BxHxLxK.astype(dt), v, False)
  # Softmax backward: ds = p * (dp - sum_t p dp), and sum_t p dp = sum_k do * o.
  delta_BxHxL = (do_BxLxHxK.astype(f32) * o_BxLxHxK.astype(f32)).sum(-1).transpose(0, 2, 1)
  ds_BxHxLxL = (e_BxHxLxL.astype(f32) * inv_BxHxL[..., None]
                * (dp_BxHxLxL - delta_BxHxL[..., None])).astype(dt)
  dq_BxHxLxK = _bdot("bhqt,bhtk->bhqk", ds_BxHxLxL, k, False)
  if eigen:  # dk^T = q^T ds: q contracted on its axis 2
    dk_BxHxKxL = _bdot("bhqk,bhqt->bhkt", q, ds_BxHxLxL, True)
  else:
    dk_BxHxKxL = _bdot("bhkq,bhqt->bhkt", _materialized_transpose(q, (0, 1, 3, 2)), ds_BxHxLxL,
                       False)
  dk = dk_BxHxKxL.transpose(0, 3, 1, 2)
  dq = (dq_BxHxLxK * scale).transpose(0, 2, 1, 3)
  dv = dv_BxHxKxL.transpose(0, 3, 1, 2)
  return dq.astype(dt), dk.astype(dt), dv.astype(dt), None


attend.defvjp(_attend_fwd, _attend_bwd)


@jax.custom_vjp
def _add_bias(y_NxM, b_M):
  return y_NxM + b_M.astype(y_NxM.dtype)


def _add_bias_fwd(y_NxM, b_M):
  return _add_bias(y_NxM, b_M), jnp.zeros((0,), b_M.dtype)  # carries b's dtype


def _add_bias_bwd(b_like, g_NxM):
  # db = 1^T g as a (float32-accumulating) GEMM: a bfloat16 reduction over N makes XLA:CPU copy
  # g to float32 and run a tree reduction instead, about 12 % of a bf16 step at the reference.
  g = g_NxM.reshape(-1, g_NxM.shape[-1])
  db = _dot(jnp.ones((1, g.shape[0]), g.dtype), g, ((1,), (0,)), None, jnp.float32)[0]
  return g_NxM, db.astype(b_like.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Module):
  """nn.Dense's parameters and math (kernel, optional bias) with loopjax's matmul
  (`dense_dot_general`) and bias gradient (`_add_bias`)."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = None
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = dense_dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                          (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      y = _add_bias(y, self.param("bias", self.bias_init, (self.features,)))
    return y


class _Kernel(nn.Module):
  """A DenseGeneral-compatible kernel parameter (same name, shape, init, logical axes)."""

  shape: tuple
  axes: tuple

  @nn.compact
  def __call__(self):
    init = dense_init(self.axes)

    def flat_init(rng, shape, dtype=jnp.float32):
      # As DenseGeneral: initialise (inputs, prod(features)) so fan_in is the input width.
      kernel = init(rng, (shape[0], math.prod(shape[1:])), dtype)
      return nn.meta.replace_boxed(kernel, jnp.reshape(kernel.unbox(), shape))

    return self.param("kernel", flat_init, self.shape)


class Attention(nn.Module):
  """Bidirectional multi-head attention with RoPE; optionally returns the probabilities."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_Bx1xLxL, *, train: bool, return_probs: bool = False):
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    h, k = cfg.num_heads, cfg.head_dim
    # q, k, v: the kernels of three DenseGenerals (same parameter tree), applied as one
    # custom-VJP op that saves its shared input once.
    d = x_BxLxD.shape[-1]
    ws = [_Kernel((d, h, k), ("embed", "heads", "kv"), name=n)().astype(dt).reshape(d, h * k)
          for n in ("query", "key", "value")]
    q, kk, v = _matmuls(x_BxLxD.astype(dt).reshape(-1, d), ws, None)
    shape = x_BxLxD.shape[:-1] + (h, k)
    q_BxLxHxK = rope(q.reshape(shape), cfg.rope_base)
    k_BxLxHxK = rope(kk.reshape(shape), cfg.rope_base)
    v_BxLxHxK = v.reshape(shape)
    probs = None
    if return_probs:  # analysis path: materialise the probabilities
      logits_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK, k_BxLxHxK) / math.sqrt(k)
      logits_BxHxLxL = jnp.where(mask_Bx1xLxL, logits_BxHxLxL.astype(jnp.float32), -1e30)
      probs = jax.nn.softmax(logits_BxHxLxL, axis=-1)
      out_BxLxHxK = jnp.einsum("bhqt,bthk->bqhk", probs.astype(dt), v_BxLxHxK)
    elif cfg.attention_impl == "cudnn":
      out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxL, implementation="cudnn")
    else:
      out_BxLxHxK = attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL)
    out_BxLxD = nn.DenseGeneral(
        cfg.width, axis=(-2, -1), use_bias=False, dtype=dt, dot_general=dense_dot_general,
        kernel_init=dense_init(("heads", "kv", "embed")), name="out")(out_BxLxHxK)
    out_BxLxD = nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=not train)
    # The remat policy "save_attn_out" keeps this and recomputes the rest.
    out_BxLxD = checkpoint_name(out_BxLxD, "attn_out")
    return out_BxLxD, (probs if return_probs else None)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, *, train: bool):
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    dense = lambda n, name, axes: Dense(n, use_bias=cfg.mlp_type == "gelu", dtype=dt,
                                        kernel_init=dense_init(axes), name=name)
    if cfg.mlp_type == "swiglu":
      gate = dense(cfg.mlp_dim, "wi_gate", ("embed", "mlp"))(x_BxLxD)
      h_BxLxF = nn.silu(gate) * dense(cfg.mlp_dim, "wi_up", ("embed", "mlp"))(x_BxLxD)
    else:
      h_BxLxF = nn.gelu(dense(cfg.mlp_dim, "wi", ("embed", "mlp"))(x_BxLxD), approximate=True)
    h_BxLxF = nn.Dropout(cfg.dropout)(h_BxLxF, deterministic=not train)
    out = dense(cfg.width, "wo", ("mlp", "embed"))(h_BxLxF)
    return nn.Dropout(cfg.dropout)(out, deterministic=not train)


def layer_norm(dt, name):
  # MDLM's LayerNorm: scale, no bias; statistics in float32.
  return nn.LayerNorm(use_bias=False, dtype=dt, param_dtype=jnp.float32,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      name=name)


def adaln_modulation(c_BxC, n: int, width: int, name: str):
  """Zero-initialised projection of the conditioning vector into n shift/scale/gate vectors."""
  mod = nn.Dense(n * width, name=name, dtype=jnp.float32,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("cond", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(c_BxC)
  return jnp.split(mod[:, None, :], n, axis=-1)  # each B x 1 x D


class Block(nn.Module):
  """Pre-norm transformer layer with adaLN (shift, scale, gate) modulation, as in MDLM's DDiT."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, c_BxC, mask_Bx1xLxL, train: bool = False,
               return_probs: bool = False):
    dt = compute_dtype(self.cfg)
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(
        c_BxC, 6, self.cfg.width, "adaln")
    y = layer_norm(dt, "norm_attn")(x_BxLxD) * (1 + scale1) + shift1
    y, probs = Attention(self.cfg, name="attn")(
        y.astype(dt), mask_Bx1xLxL, train=train, return_probs=return_probs)
    x_BxLxD = x_BxLxD + (gate1 * y).astype(x_BxLxD.dtype)
    y = layer_norm(dt, "norm_mlp")(x_BxLxD) * (1 + scale2) + shift2
    y = Mlp(self.cfg, name="mlp")(y.astype(dt), train=train)
    x_BxLxD = x_BxLxD + (gate2 * y).astype(x_BxLxD.dtype)
    return x_BxLxD, probs
