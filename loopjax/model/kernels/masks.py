"""Document masking: which keys a query may attend to, in the two forms kernel sets consume.

Rows packed from several documents carry segment ids (B x L ints, 0 = padding). A query
attends to the keys of its own document; a padding position attends only to itself, so no
softmax row is empty. `AttentionMask` carries both forms through the model: the dense
B x 1 x L x L boolean mask (materialised-softmax kernels, cuDNN's bias) and the segment ids
themselves (block-sparse kernels such as splash, which never build an L x L array). A kernel
uses one of them; under jit the other is dead code and is not computed.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


def dense_mask(segment_ids_BxL: Optional[Array], b: int, length: int) -> Array:
  """The B x 1 x L x L boolean mask of `segment_ids_BxL` (None: one document per row)."""
  if segment_ids_BxL is None:
    return jnp.ones((b, 1, length, length), bool)
  same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  eye = jnp.eye(length, dtype=bool)[None]
  return ((same & (segment_ids_BxL[:, None, :] > 0)) | eye)[:, None]


def unique_padding_ids(segment_ids_BxL: Array, length: Optional[int] = None) -> Array:
  """Segment ids under which "same id" alone is the document mask: padding position i (id 0)
  gets id -1 - i, which no other position shares, so it attends only to itself. With `length`
  > L the rows are extended to `length` with more such positions (kernel block padding)."""
  b, seq = segment_ids_BxL.shape
  length = seq if length is None else length
  ids = jnp.pad(segment_ids_BxL.astype(jnp.int32), ((0, 0), (0, length - seq)))
  own = -1 - jnp.arange(length, dtype=jnp.int32)[None, :]
  return jnp.where(ids > 0, ids, own)


@struct.dataclass
class AttentionMask:
  """The model's attention mask: the dense form and the segment ids it was built from."""

  dense_Bx1xLxL: Array
  segment_ids_BxL: Optional[Array] = None  # None: every row is one document, no padding

  @classmethod
  def from_segment_ids(cls, segment_ids_BxL: Optional[Array], b: int, length: int):
    return cls(dense_mask(segment_ids_BxL, b, length), segment_ids_BxL)
