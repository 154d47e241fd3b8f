"""Kernel sets: interchangeable implementations of the model's compute-heavy ops.

`model.kernels` names one set. Every set computes the reference math (`reference.py`, plain jnp
under autodiff, the one that runs everywhere and supports `jax.jvp`); the others rearrange it
for a backend and are tested against it:

  reference  plain jnp: nn.Dense's matmul and bias, einsum-softmax attention
  xla_cpu    custom-VJP matmuls, bias and attention arranged for XLA:CPU's GEMMs (xla_cpu.py)
  cudnn      the reference dense layers with cuDNN's fused attention in bf16 (NVIDIA GPUs;
             cudnn.py)
  splash     the reference dense layers with Pallas splash attention from segment ids (TPUs;
             splash.py; sharded per device with shard_map under the model's mesh)
  auto       one of the above, chosen by `resolve` from the devices the step is compiled for

Attention gets the document mask in both forms (masks.py): the dense B x 1 x L x L mask and the
segment ids it is built from; a set reads the one its kernel takes.

A new set is a `Kernels` entry in `_SETS` (and, if `auto` should pick it, a line in `_AUTO`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax

from loopjax.model.kernels import cudnn, reference, splash, xla_cpu
from loopjax.model.kernels.masks import AttentionMask


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One implementation of each op the layers delegate."""

  # (x_NxK, [w_KxM, ...]) -> [x @ w, ...]: weights of one shape sharing an input (q, k, v).
  projections: Callable
  # lax.dot_general's signature: the dense layers' contraction (Dense, DenseGeneral).
  dot_general: Callable
  add_bias: Callable  # (y_NxM, b_M) -> y + b
  # (q, k, v B x L x H x K, bool mask B x 1 x L x L, segment ids B x L or None)
  #   -> softmax(q k^T / sqrt(K), masked) v. The mask is `masks.dense_mask` of the segment ids
  # (the document mask); a set reads whichever of the two forms its kernel takes.
  attention: Callable


def _dense_mask_only(attention: Callable) -> Callable:
  """An attention of (q, k, v, mask) as a kernel-set attention (the segment ids unused)."""
  def attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL, segment_ids_BxL=None):
    del segment_ids_BxL
    return attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL)
  return attend


_REFERENCE = Kernels(projections=reference.projections, dot_general=jax.lax.dot_general,
                     add_bias=reference.add_bias,
                     attention=_dense_mask_only(reference.attention))

_SETS = {
    "reference": _REFERENCE,
    "xla_cpu": Kernels(projections=xla_cpu.projections, dot_general=xla_cpu.dot_general,
                       add_bias=xla_cpu.add_bias,
                       attention=_dense_mask_only(xla_cpu.attention)),
    "cudnn": dataclasses.replace(_REFERENCE, attention=cudnn.attention),
    "splash": dataclasses.replace(_REFERENCE, attention=splash.attention),
}

KERNELS = ("auto",) + tuple(_SETS)

# What `auto` picks per device platform. TPUs get splash (flash attention from segment ids, no
# L x L arrays): it compiles for real TPU topologies (any L, K: it pads L to its blocks) and
# equals the reference in Pallas' interpreter; `model.kernels=reference` is the fallback. GPUs
# get the reference: cudnn cannot even be lowered without a GPU (jax asks the cuDNN library
# while tracing), so it is chosen explicitly.
_AUTO = {"cpu": "xla_cpu", "tpu": "splash", "gpu": "reference", "cuda": "reference",
         "rocm": "reference"}


# Kernel sets bound to one kind of device (the others run anywhere XLA does).
_PLATFORMS = {"splash": {"tpu"}, "cudnn": {"gpu", "cuda"}}


def get(name: str) -> Kernels:
  """The kernel set `name`; `auto` must have been resolved first (see `resolve`)."""
  if name == "auto":
    raise ValueError("model.kernels='auto' must be resolved for the devices the step is "
                     "compiled for: loopjax.model.resolve_kernels(cfg, devices)")
  if name not in _SETS:
    raise ValueError(f"model.kernels: {name!r} is not one of {KERNELS}")
  return _SETS[name]


def resolve(name: str, devices: Iterable[Any]) -> str:
  """`name`, or for `auto` the kernel set for the platform of `devices` (mesh devices or AOT
  topology devices: anything with a `.platform`)."""
  platforms = sorted({d.platform for d in devices})
  if name != "auto":
    get(name)
    wrong = sorted(set(platforms) - _PLATFORMS.get(name, set(platforms)))
    if wrong:
      raise ValueError(f"model.kernels={name!r} runs on {sorted(_PLATFORMS[name])} devices only, "
                       f"but the step is compiled for {wrong}; use 'auto' or 'reference'")
    return name
  if len(platforms) != 1:
    raise ValueError(f"model.kernels='auto' needs devices of one platform, got "
                     f"{platforms or 'none'}; set model.kernels to one of {KERNELS[1:]}")
  if platforms[0] not in _AUTO:
    raise ValueError(f"model.kernels='auto': no kernel set known for platform "
                     f"{platforms[0]!r}; set model.kernels to one of {KERNELS[1:]}")
  return _AUTO[platforms[0]]


def runs_on(name: str, devices: Iterable[Any]) -> bool:
  """Whether the kernel set `name` (or `auto`) can run on the platform of every one of
  `devices`: false only for a set bound to other devices (splash off TPU, cudnn off GPU)."""
  bound = _PLATFORMS.get(name)
  return bound is None or {d.platform for d in devices} <= bound


def resolve_kernels(cfg, devices: Iterable[Any]):
  """`cfg` (a ModelConfig) unchanged unless `cfg.kernels == "auto"`; then with the kernel set
  `resolve` picks for `devices`. A set bound to other devices than `devices` is an error."""
  name = resolve(cfg.kernels, devices)
  return cfg if name == cfg.kernels else dataclasses.replace(cfg, kernels=name)
