"""cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`), NVIDIA GPUs
only; the dense layers are the reference ones (GPU GEMMs take any operand layout at full speed).
"""

from __future__ import annotations

import jax

Array = jax.Array


def attention(q_BxLxHxK: Array, k_BxLxHxK: Array, v_BxLxHxK: Array,
              mask_Bx1xLxL: Array) -> Array:
  """The reference attention's math as one fused cuDNN kernel (B x L x H x K layout)."""
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxL,
                                      implementation="cudnn")
