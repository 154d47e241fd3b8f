"""Transformer pieces of the MDLM-style denoiser: RoPE, attention, MLP, adaLN block.

Every parameter carries logical axis names (see loopjax/parallel) so one rules table decides how
it is sharded. Compute happens in `cfg.dtype`; parameters are float32. The matmuls and the
attention itself are delegated to the kernel set `cfg.kernels` (see loopjax/model/kernels):
the parameters and the math are the same for every set.
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

from loopjax.model import kernels as kernels_lib
from loopjax.model.config import ModelConfig
from loopjax.model.kernels import reference
from loopjax.parallel import mesh as mesh_lib

Array = jax.Array


def compute_dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def constrain(x, *names):
  """x's layout by logical activation axes (`act_*`; a no-op outside a rules context); an axis
  whose mesh axes do not divide its dimension stays whole."""
  return nn.with_logical_constraint(x, mesh_lib.fit_logical(names, x.shape))


def stream_axes(cfg: ModelConfig) -> tuple:
  """Logical axes of the residual stream between blocks: with model.sequence_parallel, the
  length split over tensor (`act_seq`), else whole (`act_length`)."""
  return ("act_batch", "act_seq" if cfg.sequence_parallel else "act_length", "act_embed")
BLHK = ("act_batch", "act_length", "act_heads", "act_kv")


def kernel_initializer(kind: str = "lecun_normal", scale: float = 1.0):
  """A Dense kernel initializer (fan_in = the input size). "torch": torch nn.Linear's default,
  kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1/(3 fan_in)."""
  if kind == "torch":
    return nn.initializers.variance_scaling(scale / 3.0, "fan_in", "uniform")
  return nn.initializers.variance_scaling(scale, "fan_in", "normal")


def dense_init(axes, scale: float = 1.0, kind: str = "lecun_normal"):
  return nn.with_logical_partitioning(kernel_initializer(kind, scale), axes)


def bias_init(fan_in: int, kind: str = "lecun_normal"):
  """Zero biases, or torch nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kind "torch"."""
  if kind != "torch":
    return nn.initializers.zeros_init()
  bound = 1.0 / math.sqrt(fan_in)

  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)

  return init


@functools.lru_cache(maxsize=64)
def _rope_tables(length: int, k: int, base: float):
  """cos and sin of the rotation angles, L x K/2 float32, as NumPy constants (computed in the
  graph, XLA would fuse the transcendentals into every consumer and recompute them)."""
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


class Dense(nn.Module):
  """nn.Dense (same parameters, init and math), its matmul and bias from the kernel set."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = None
  bias_init: Any = nn.initializers.zeros_init()
  kernels: str = "reference"

  @nn.compact
  def __call__(self, x):
    ops = kernels_lib.get(self.kernels)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = ops.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                        (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      y = ops.add_bias(y, self.param("bias", self.bias_init, (self.features,)))
    return y


class _Kernel(nn.Module):
  """nn.DenseGeneral's kernel parameter (same name, shape, init) over the first `n_in` axes.

  The logical axes label the kernel's own shape: DenseGeneral labels its flattened init, which
  cannot carry them once a rules context turns the labels into sharding constraints."""

  shape: tuple
  axes: tuple
  n_in: int = 1
  init_kind: str = "lecun_normal"  # see `kernel_initializer`

  @nn.compact
  def __call__(self):
    init = kernel_initializer(self.init_kind)

    def flat_init(rng, shape, dtype=jnp.float32):
      # As DenseGeneral: initialise (inputs, outputs) flattened, so fan_in is the input size.
      flat = (math.prod(shape[:self.n_in]), math.prod(shape[self.n_in:]))
      return jnp.reshape(init(rng, flat, dtype), shape)

    return self.param("kernel", nn.with_logical_partitioning(flat_init, self.axes), self.shape)


class Attention(nn.Module):
  """Bidirectional multi-head attention with RoPE; optionally returns the probabilities."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask: kernels_lib.AttentionMask, *, train: bool,
               return_probs: bool = False):
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    ops = kernels_lib.get(cfg.kernels)
    h, k = cfg.num_heads, cfg.head_dim
    # q, k, v: the D x H x K kernels of three DenseGenerals without bias, applied to their
    # shared input in one call.
    d = x_BxLxD.shape[-1]
    ws = [_Kernel((d, h, k), ("embed", "heads", "kv"), init_kind=cfg.dense_init,
                  name=n)().astype(dt).reshape(d, h * k)
          for n in ("query", "key", "value")]
    q, kk, v = ops.projections(x_BxLxD.astype(dt).reshape(-1, d), ws)
    shape = x_BxLxD.shape[:-1] + (h, k)
    q_BxLxHxK = constrain(rope(q.reshape(shape), cfg.rope_base), *BLHK)
    k_BxLxHxK = constrain(rope(kk.reshape(shape), cfg.rope_base), *BLHK)
    v_BxLxHxK = constrain(v.reshape(shape), *BLHK)
    probs = None
    if return_probs:  # analysis path: the reference math, probabilities materialised
      probs = reference.attention_probs(q_BxLxHxK, k_BxLxHxK, mask.dense_Bx1xLxL)
      out_BxLxHxK = jnp.einsum("bhqt,bthk->bqhk", probs.astype(dt), v_BxLxHxK)
    else:
      out_BxLxHxK = ops.attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask.dense_Bx1xLxL,
                                  mask.segment_ids_BxL)
    out_BxLxHxK = constrain(out_BxLxHxK, *BLHK)
    w_HxKxD = _Kernel((h, k, cfg.width), ("heads", "kv", "embed"), n_in=2,
                      init_kind=cfg.dense_init, name="out")()
    out_BxLxD = constrain(ops.dot_general(out_BxLxHxK.astype(dt), w_HxKxD.astype(dt),
                                          (((2, 3), (0, 1)), ((), ()))), *stream_axes(cfg))
    out_BxLxD = nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=not train)
    # The remat policy "save_attn_out" keeps this and recomputes the rest.
    out_BxLxD = checkpoint_name(out_BxLxD, "attn_out")
    return out_BxLxD, probs


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, *, train: bool):
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    def dense(n, name, axes, fan_in):
      return Dense(n, use_bias=cfg.mlp_type == "gelu", dtype=dt,
                   kernel_init=dense_init(axes, kind=cfg.dense_init),
                   bias_init=bias_init(fan_in, cfg.dense_init), kernels=cfg.kernels,
                   name=name)

    d, f = cfg.width, cfg.mlp_dim
    if cfg.mlp_type == "swiglu":
      gate = dense(f, "wi_gate", ("embed", "mlp"), d)(x_BxLxD)
      h_BxLxF = nn.silu(gate) * dense(f, "wi_up", ("embed", "mlp"), d)(x_BxLxD)
    else:
      h_BxLxF = nn.gelu(dense(f, "wi", ("embed", "mlp"), d)(x_BxLxD), approximate=True)
    h_BxLxF = constrain(h_BxLxF, "act_batch", "act_length", "act_mlp")
    if cfg.mlp_hidden_dropout:
      h_BxLxF = nn.Dropout(cfg.dropout)(h_BxLxF, deterministic=not train)
    # Summed over the tensor-sharded units straight into the length-split stream.
    out = constrain(dense(d, "wo", ("mlp", "embed"), f)(h_BxLxF), *stream_axes(cfg))
    # As MDLM's bias_dropout_add_scale: dropout on the branch output, then the adaLN gate.
    return nn.Dropout(cfg.dropout)(out, deterministic=not train)


def layer_norm(dt, name, eps: float = 1e-6):
  # MDLM's LayerNorm: scale, no bias; statistics in float32.
  return nn.LayerNorm(epsilon=eps, use_bias=False, dtype=dt, param_dtype=jnp.float32,
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
  def __call__(self, x_BxLxD, c_BxC, mask: kernels_lib.AttentionMask, train: bool = False,
               return_probs: bool = False):
    dt = compute_dtype(self.cfg)
    x_BxLxD = constrain(x_BxLxD, *stream_axes(self.cfg))
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(
        c_BxC, 6, self.cfg.width, "adaln")
    y = layer_norm(dt, "norm_attn", self.cfg.norm_eps)(x_BxLxD) * (1 + scale1) + shift1
    y, probs = Attention(self.cfg, name="attn")(
        y.astype(dt), mask, train=train, return_probs=return_probs)
    # Residual adds in float32, rounded once to the stream's dtype.
    x_BxLxD = (x_BxLxD.astype(jnp.float32) + gate1 * y).astype(x_BxLxD.dtype)
    y = layer_norm(dt, "norm_mlp", self.cfg.norm_eps)(x_BxLxD) * (1 + scale2) + shift2
    y = Mlp(self.cfg, name="mlp")(y.astype(dt), train=train)
    x_BxLxD = (x_BxLxD.astype(jnp.float32) + gate2 * y).astype(x_BxLxD.dtype)
    return constrain(x_BxLxD, *stream_axes(self.cfg)), probs
