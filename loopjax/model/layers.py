"""Transformer pieces of the MDLM-style denoiser: RoPE, attention, MLP, adaLN block.

Every parameter carries logical axis names (see loopjax/parallel) so one rules table decides how
it is sharded. Compute happens in `cfg.dtype`; parameters are float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from loopjax.model.config import ModelConfig

Array = jax.Array


def compute_dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def dense_init(axes, scale: float = 1.0):
  return nn.with_logical_partitioning(nn.initializers.variance_scaling(scale, "fan_in", "normal"),
                                      axes)


def rope(x_BxLxHxK: Array, base: float) -> Array:
  """Rotary position embedding (rotate-half form) over the last axis."""
  _, length, _, k = x_BxLxHxK.shape
  inv_freq_K2 = 1.0 / (base ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  ang_LxK2 = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_K2[None, :]
  cos, sin = jnp.cos(ang_LxK2)[None, :, None, :], jnp.sin(ang_LxK2)[None, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Attention(nn.Module):
  """Bidirectional multi-head attention with RoPE; optionally returns the probabilities."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_Bx1xLxL, *, train: bool, return_probs: bool = False):
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    h, k = cfg.num_heads, cfg.head_dim
    proj = lambda name, axes: nn.DenseGeneral(
        (h, k), axis=-1, use_bias=False, dtype=dt, kernel_init=dense_init(axes), name=name)
    q_BxLxHxK = rope(proj("query", ("embed", "heads", "kv"))(x_BxLxD), cfg.rope_base)
    k_BxLxHxK = rope(proj("key", ("embed", "heads", "kv"))(x_BxLxD), cfg.rope_base)
    v_BxLxHxK = proj("value", ("embed", "heads", "kv"))(x_BxLxD)
    probs = None
    if cfg.attention_impl == "cudnn" and not return_probs:
      out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxL, implementation="cudnn")
    else:
      logits_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK, k_BxLxHxK) / math.sqrt(k)
      logits_BxHxLxL = jnp.where(mask_Bx1xLxL, logits_BxHxLxL.astype(jnp.float32), -1e30)
      probs = jax.nn.softmax(logits_BxHxLxL, axis=-1)
      out_BxLxHxK = jnp.einsum("bhqt,bthk->bqhk", probs.astype(dt), v_BxLxHxK)
    out_BxLxD = nn.DenseGeneral(
        cfg.width, axis=(-2, -1), use_bias=False, dtype=dt,
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
    dense = lambda n, name, axes: nn.Dense(n, use_bias=cfg.mlp_type == "gelu", dtype=dt,
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
