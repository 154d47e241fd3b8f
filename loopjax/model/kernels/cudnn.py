"""cuDNN's fused (flash) attention through `jax.nn.dot_product_attention(implementation="cudnn")`,
NVIDIA GPUs only; the dense layers are the reference ones (GPU GEMMs take any operand layout at
full speed).

What cuDNN takes, and how the model's attention is given to it:
- operands: float16/bfloat16 only. q, k, v in any other dtype are cast to bfloat16 and the
  output back to their dtype (softmax statistics stay float32 inside the kernel).
- the document mask: cuDNN's own masks are causal, sliding-window and padding by sequence
  lengths (`query_seq_lengths`), which cannot say "several documents in one row". The boolean
  B x 1 x L x L mask is passed instead; jax turns it into an additive bias (0 / a large
  negative number) that the kernel broadcasts over heads. Rows of one document (no segment
  ids) pass no mask at all.
- shapes: head dim a multiple of 8 and at most 256 (128 before Hopper); with a bias in training,
  an even length. Checked here before anything is compiled (the head-dim bound per GPU
  generation is left to jax's own check).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)


def check_shapes(q_BxLxHxK: Array, with_mask: bool) -> None:
  """Raises ValueError naming the constraint cuDNN's fused attention puts on these shapes."""
  _, length, _, k = q_BxLxHxK.shape
  if k % 8 or k > 256:
    raise ValueError(f"model.kernels='cudnn': cuDNN fused attention needs a head dim that is a "
                     f"multiple of 8 and at most 256 (128 before Hopper), got {k} "
                     "(model.width / model.num_heads)")
  if with_mask and length % 2:
    raise ValueError(f"model.kernels='cudnn': cuDNN fused attention with a mask needs an even "
                     f"sequence length, got {length}")


def attention(q_BxLxHxK: Array, k_BxLxHxK: Array, v_BxLxHxK: Array, mask_Bx1xLxL: Array,
              segment_ids_BxL: Optional[Array] = None, *,
              implementation: Optional[str] = "cudnn") -> Array:
  """The reference attention's math as one fused cuDNN kernel (B x L x H x K layout).

  `implementation` is jax.nn.dot_product_attention's: "xla" runs the same prepared call
  (casts, mask) with XLA's attention, on any backend, to test the preparation."""
  with_mask = segment_ids_BxL is not None
  check_shapes(q_BxLxHxK, with_mask)
  dt = q_BxLxHxK.dtype
  fused = dt if any(dt == d for d in _FUSED_DTYPES) else jnp.bfloat16
  q, k, v = (x.astype(fused) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xLxL if with_mask else None,
                                     implementation=implementation)
  return out.astype(dt)
