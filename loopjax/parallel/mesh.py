"""The device mesh (`data`, `fsdp`, `tensor`) and the one table of logical-axis rules.

Parameters carry logical names (`embed`, `heads`, `mlp`, ...); activations use `batch` and
`length`. `LOGICAL_RULES` maps each to mesh axes; nothing else in loopjax names a mesh axis.
"""

from __future__ import annotations

import math
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Batch splits over data and fsdp (FSDP is data parallel with sharded
# weights); weights shard their embed dim over fsdp and heads/mlp/vocab over tensor.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("cond", None),
    ("layers", None),
    ("loops", None),
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves the configured sizes (-1 = fill) against the device count, or raises."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"mesh: at most one axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(f"mesh: fixed axes {dict(zip(MESH_AXES, sizes))} (product {known}) do not "
                       f"divide the {num_devices} available devices")
    sizes[fills[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                     f"{num_devices} are available; sizes must multiply to the device count "
                     "(use -1 on one axis to fill)")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  if devices is jax.devices() or len(devices) == jax.device_count():
    try:
      # Lays axes out over the physical topology (ICI inside a slice) where the backend knows it.
      from jax.experimental import mesh_utils
      dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / unknown topologies: plain order is as good as any.
      dev_array = np.asarray(devices).reshape(shape)
  else:
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_sharding(mesh: Mesh, logical_spec) -> NamedSharding:
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_spec, LOGICAL_RULES))


def tree_shardings(mesh: Mesh, abstract_tree):
  """NamedShardings for a tree whose leaves may be nn.Partitioned boxes (unboxed result)."""
  specs = nn.get_partition_spec(abstract_tree)
  return jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, nn.logical_to_mesh_axes(s, LOGICAL_RULES)), specs,
      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return logical_sharding(mesh, ("batch", "length"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
