"""Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), TPUs only
(and the CPU, in Pallas interpret mode, for tests).

Bidirectional (`FullMask`: a diffusion LM is not causal), with the document mask expressed as
segment ids, so no L x L mask or probability array is ever built: the kernel skips nothing for
a full mask but tiles the softmax in blocks of `block` x `block` (flash attention).

Layout and constraints: the kernel takes one batch row of H x L x K (vmapped over rows here)
and does not scale the logits, so q is scaled by 1/sqrt(K) first. Its blocks are multiples of
128 positions that divide L; a length that no such block divides is padded to the next multiple
of 128 with positions of their own segment (attending to nothing else) and sliced off after.

Under a mesh the kernel, a Pallas custom call that the SPMD partitioner cannot split, runs per
shard in a `shard_map` over the activations' logical batch and heads axes (the rules table of
loopjax/parallel). The length and head-dim axes are whole on every shard (the specs leave them
unsharded), so each shard's result is its part of the global one. A batch or heads axis that
its mesh axes do not divide is replicated instead (correct, at the cost of a gather).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from loopjax.model.kernels import masks

Array = jax.Array

LANES = 128  # the kernel's blocks are multiples of this many positions
MAX_BLOCK = 512


def block_size(length: int) -> int:
  """The largest multiple of 128, at most 512, dividing `length` (itself a multiple of 128)."""
  for b in range(MAX_BLOCK, 0, -LANES):
    if length % b == 0:
      return b
  raise ValueError(f"splash attention: padded length {length} is not a multiple of {LANES}")


def padded_length(length: int) -> int:
  return -(-length // LANES) * LANES


def _kernel(heads: int, length: int, interpret: bool):
  """A splash kernel for one batch row (heads x length x K), built per call: its mask tables
  are arrays of the trace it is built in."""
  # Imported here: Pallas' TPU ops cost a noticeable import time, paid only when used.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
  block = block_size(length)
  sizes = splash_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                block_q_dkv=block, block_kv_dkv=block,
                                block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash_lib.MultiHeadMask([splash_lib.FullMask((length, length))] * heads)
  return splash_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)


def _local_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, ids_BxL=None, *, interpret: bool):
  """Splash on whole rows (one shard's, or all of them): B x H x L x K in and out."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
  kernel = _kernel(q_BxHxLxK.shape[1], q_BxHxLxK.shape[2], interpret)
  if ids_BxL is None:
    return jax.vmap(kernel)(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(
      q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, ids_BxL)


def _mesh_axes(spec_entry, mesh):
  names = () if spec_entry is None else (spec_entry if isinstance(spec_entry, tuple)
                                         else (spec_entry,))
  return names, math.prod(mesh.shape[n] for n in names)


def _per_shard(fn, q_BxHxLxK, with_ids: bool):
  """`fn` wrapped in a shard_map over the mesh of the current rules context (batch and heads
  sharded by their logical rules), or `fn` itself outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  batch, heads = nn.logical_to_mesh_axes(("act_batch", "act_heads"))
  if mesh.empty or (batch is None and heads is None):
    return fn
  entries = []
  for entry, size in ((batch, q_BxHxLxK.shape[0]), (heads, q_BxHxLxK.shape[1])):
    names, n = _mesh_axes(entry, mesh)
    entries.append(entry if names and size % n == 0 else None)
  qkv = P(entries[0], entries[1], None, None)
  specs = (qkv, qkv, qkv) + ((P(entries[0], None),) if with_ids else ())
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)


def attention(q_BxLxHxK: Array, k_BxLxHxK: Array, v_BxLxHxK: Array, mask_Bx1xLxL: Array,
              segment_ids_BxL: Optional[Array], *, interpret: bool = False) -> Array:
  """softmax(q k^T / sqrt(K), document mask) v from the segment ids (the dense mask is not
  read); B x L x H x K in and out. `interpret`: run the kernel in Pallas' interpreter (CPU)."""
  del mask_Bx1xLxL  # the same mask, as segment ids
  b, length, _, k = q_BxLxHxK.shape
  dt = q_BxLxHxK.dtype
  lp = padded_length(length)
  ids = None
  if segment_ids_BxL is not None or lp != length:
    seg = jnp.ones((b, length), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL
    ids = masks.unique_padding_ids(seg, lp)

  def heads_major(x, scale=None):
    if scale is not None:
      x = (x.astype(jnp.float32) * scale).astype(dt)
    return jnp.pad(x, ((0, 0), (0, lp - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  q = heads_major(q_BxLxHxK, 1.0 / math.sqrt(k))
  kk, v = heads_major(k_BxLxHxK), heads_major(v_BxLxHxK)
  fn = functools.partial(_local_attention, interpret=interpret)
  args = (q, kk, v) if ids is None else (q, kk, v, ids)
  out_BxHxLxK = _per_shard(fn, q, ids is not None)(*args)
  return out_BxHxLxK.transpose(0, 2, 1, 3)[:, :length]


def interpreted(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL, segment_ids_BxL):
  """`attention` in Pallas' interpreter: the same kernel on any backend (tests)."""
  return attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL, segment_ids_BxL,
                   interpret=True)
