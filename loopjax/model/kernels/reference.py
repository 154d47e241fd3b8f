"""The plain kernels: each op as its textbook jnp expression, differentiated by autodiff.

This is the definition the other kernel sets are tested against; it supports forward- and
reverse-mode AD and runs on every backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def projections(x_NxK: Array, ws_KxM: list[Array]) -> list[Array]:
  """[x @ w for w in ws]."""
  return [jnp.dot(x_NxK, w_KxM) for w_KxM in ws_KxM]


def add_bias(y_NxM: Array, b_M: Array) -> Array:
  return y_NxM + b_M.astype(y_NxM.dtype)


def attention_probs(q_BxLxHxK: Array, k_BxLxHxK: Array, mask_Bx1xLxL: Array) -> Array:
  """softmax(q k^T / sqrt(K)) over the allowed keys, B x H x L x L float32."""
  logits_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK, k_BxLxHxK,
                              preferred_element_type=jnp.float32)
  logits_BxHxLxL = logits_BxHxLxL / math.sqrt(q_BxLxHxK.shape[-1])
  return jax.nn.softmax(jnp.where(mask_Bx1xLxL, logits_BxHxLxL, -1e30), axis=-1)


def attention(q_BxLxHxK: Array, k_BxLxHxK: Array, v_BxLxHxK: Array,
              mask_Bx1xLxL: Array) -> Array:
  """softmax(q k^T / sqrt(K), masked) v for B x L x H x K inputs; returns B x L x H x K."""
  probs_BxHxLxL = attention_probs(q_BxLxHxK, k_BxLxHxK, mask_Bx1xLxL)
  return jnp.einsum("bhqt,bthk->bqhk", probs_BxHxLxL.astype(v_BxLxHxK.dtype), v_BxLxHxK)
