"""The device mesh (`data`, `fsdp`, `tensor`) and the one table of logical-axis rules.

Parameters carry logical names (`embed`, `heads`, `mlp`, ...); activations carry `act_*` names
(the model constrains them at the embedding output, every layer's input and output, attention's
q/k/v and output, the MLP's hidden units and the logits). `LOGICAL_RULES` maps each to mesh axes;
nothing else in loopjax names a mesh axis.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("loopjax")

MESH_AXES = ("data", "fsdp", "tensor")
# How much of each axis crosses the slow network between TPU slices (or GPU hosts).
DCN_KEYS = tuple(f"dcn_{a}" for a in MESH_AXES)

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
    # The looped block's gathered weights, one copy per data-parallel block of the batch (see
    # loop_groups): the copies' gradients stay per device until the loop ends.
    ("loop_group", ("data", "fsdp")),
    # Activations: the batch over data x fsdp, so FSDP gathers each layer's weights and never
    # moves activations; heads, MLP units and vocabulary over tensor (tensor parallelism).
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    # Sequence parallelism (model.sequence_parallel): between the attention and MLP blocks (the
    # residual stream, norms, adaLN, dropout) the length is split over tensor; inside them,
    # heads and MLP units are.
    ("act_seq", "tensor"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def gathered_axes(names: tuple) -> tuple:
  """A parameter's logical axes with the dimensions FSDP (or data) shards made whole: the
  layout of a weight gathered for use, tensor sharding kept."""
  spans = {name for name, axes in LOGICAL_RULES if not name.startswith("act_")
           and {"data", "fsdp"} & set((axes,) if isinstance(axes, str) else axes or ())}
  return tuple(None if n in spans else n for n in names)


def fit_logical(names: tuple, shape) -> tuple:
  """Logical activation axes with those whose mesh axes do not divide their dimension (in the
  current rules context) left unsharded: a constraint must split evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return tuple(names)
  out = []
  for name, axes, size in zip(names, nn.logical_to_mesh_axes(names, rules), shape):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out.append(name if size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
  return tuple(out)


def loop_groups(batch: int) -> tuple[int, tuple]:
  """(G, mesh axes): the data-parallel blocks the batch is split into under the current rules
  context (G = 1 outside one, or when they do not divide `batch`)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = dict(nn.get_logical_axis_rules())
  axes = rules.get("loop_group")
  if mesh.empty or not axes:
    return 1, ()
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  g = math.prod(mesh.shape[n] for n in names)
  return (g, names) if g > 1 and batch % g == 0 else (1, ())


@contextlib.contextmanager
def per_group_rules():
  """While a function of one data-parallel block of the batch is traced (vmapped over the
  blocks, `loop_groups`): its batch axis is unsharded, the vmapped axis carries the sharding."""
  rules = tuple((n, None if n == "act_batch" else a) for n, a in nn.get_logical_axis_rules())
  with nn.logical_axis_rules(rules):
    yield


@contextlib.contextmanager
def rules_context(mesh: Mesh):
  """While a function is traced: the model's activation constraints resolve to `mesh`'s axes
  through LOGICAL_RULES (outside it they are no-ops)."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def with_rules(fn, mesh: Mesh):
  """`fn` traced inside `rules_context(mesh)` (wrap before jax.jit)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with rules_context(mesh):
      return fn(*args, **kwargs)
  return traced


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves the configured sizes (-1 = fill) against the device count, or raises."""
  unknown = sorted(set(mesh_cfg.keys()) - set(MESH_AXES) - set(DCN_KEYS))
  if unknown:
    raise ValueError(f"mesh: unknown key(s) {unknown}; known: {list(MESH_AXES + DCN_KEYS)}")
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


def dcn_shape(mesh_cfg: Mapping[str, int], shape, num_granules: int) -> tuple[int, int, int]:
  """How many of each axis' devices lie across slices (DCN). Default: `data` spans the slices.

  `data`/`fsdp`/`tensor` are the whole mesh; `dcn_*` says which part of each crosses the slow
  network, so each slice (granule) holds an ICI mesh of shape `shape / dcn`.
  """
  dcn = [int(mesh_cfg.get(k, 1)) for k in DCN_KEYS]
  if math.prod(dcn) == 1 and num_granules > 1:
    dcn[0] = num_granules
  if any(d < 1 or s % d for s, d in zip(shape, dcn)):
    raise ValueError(f"mesh: dcn sizes {dict(zip(DCN_KEYS, dcn))} must be positive and divide the "
                     f"mesh {dict(zip(MESH_AXES, shape))}")
  if math.prod(dcn) != num_granules:
    raise ValueError(f"mesh: dcn sizes {dict(zip(DCN_KEYS, dcn))} multiply to {math.prod(dcn)} "
                     f"but the devices form {num_granules} slice(s) (or hosts, on GPU)")
  return tuple(dcn)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all of them)."""
  return Mesh(device_grid(mesh_cfg, jax.devices() if devices is None else devices), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(mesh_cfg: Mapping[str, int], devices) -> np.ndarray:
  """The devices as a (data, fsdp, tensor) array laid out on the topology.

  Multi-slice TPU (devices with distinct `slice_index`): a hybrid mesh whose `dcn_*` parts cross
  slices and the rest stays inside a slice's ICI. With `dcn_*` set and no slices (multi-node
  GPU), hosts are the slow-network granules. Otherwise create_device_mesh's physical layout
  (TPU/GPU), or device order (CPU, unknown backends).
  """
  from jax.experimental import mesh_utils
  devices = list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  by_process = num_slices == 1 and any(int(mesh_cfg.get(k, 1)) > 1 for k in DCN_KEYS)
  if by_process:
    groups = host_groups(devices, math.prod(int(mesh_cfg.get(k, 1)) for k in DCN_KEYS))
    dcn = dcn_shape(mesh_cfg, shape, len(groups))
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return _hybrid_grid(mesh_utils, groups, ici, dcn)
  dcn = dcn_shape(mesh_cfg, shape, num_slices)
  if num_slices > 1:
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  try:
    return mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception as e:  # CPU / unknown topologies: plain order is as good as any.
    if devices[0].platform != "cpu":
      log.warning("mesh: no topology-aware layout for %s on %s (%s); using device order",
                  shape, devices[0].device_kind, e)
    return np.asarray(devices).reshape(shape)


def host_groups(devices, num_hosts: int) -> list[list]:
  """The devices split into `num_hosts` slow-network granules on a multi-node GPU job.

  One process per node: each process is a granule. One process per GPU (SLURM's default,
  `--ntasks-per-node=GPUs`): a node's processes have consecutive ranks (SLURM's block
  distribution), so P processes on `num_hosts` nodes form groups of P / num_hosts ranks.
  """
  by_rank = {}
  for d in devices:
    by_rank.setdefault(d.process_index, []).append(d)
  ranks = sorted(by_rank)
  if len(ranks) <= num_hosts or len(ranks) % num_hosts:
    return [by_rank[r] for r in ranks]
  per_host = len(ranks) // num_hosts
  return [[d for r in ranks[h * per_host:(h + 1) * per_host] for d in by_rank[r]]
          for h in range(num_hosts)]


def _hybrid_grid(mesh_utils, groups, ici, dcn) -> np.ndarray:
  """A (data, fsdp, tensor) grid whose `dcn` parts run across `groups` and `ici` parts inside one."""
  blocks = []
  for group in groups:
    try:
      blocks.append(mesh_utils.create_device_mesh(ici, devices=group))
    except Exception:  # no topology-aware layout (CPU, fakes): device order inside the group
      blocks.append(np.asarray(group, dtype=object).reshape(ici))
  grid = np.empty(tuple(i * d for i, d in zip(ici, dcn)), dtype=object)
  for g, block in enumerate(blocks):
    pos = np.unravel_index(g, dcn)
    grid[tuple(slice(p * i, (p + 1) * i) for p, i in zip(pos, ici))] = block
  return grid


def logical_sharding(mesh: Mesh, logical_spec) -> NamedSharding:
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_spec, LOGICAL_RULES))


def tree_shardings(mesh: Mesh, abstract_tree):
  """NamedShardings for a tree whose leaves may be nn.Partitioned boxes (unboxed result).

  A dimension whose size the mesh axes do not divide (a 9-token vocabulary over tensor=2, a
  2-layer stack over an axis of 4) stays whole on that dimension instead of failing: jit
  accepts only even shardings, and such tensors are small.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shapes = nn.unbox(abstract_tree)
  return jax.tree_util.tree_map(
      lambda s, x: NamedSharding(mesh, fit_spec(mesh, nn.logical_to_mesh_axes(s, LOGICAL_RULES),
                                                getattr(x, "shape", ()))),
      specs, shapes, is_leaf=lambda x: isinstance(x, P))


def fit_spec(mesh: Mesh, spec: P, shape) -> P:
  """`spec` with the mesh axes of each dimension that they do not divide evenly dropped."""
  out = []
  for i, axes in enumerate(tuple(spec)[:len(shape)]):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if size == 1 or shape[i] % size == 0 else None)
  return P(*out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return logical_sharding(mesh, ("batch", "length"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(mesh: Mesh, batch_size: int, grad_accum: int = 1,
                          name: str = "train.batch_size") -> None:
  dp = data_parallel_size(mesh)
  if batch_size % (dp * grad_accum):
    raise ValueError(f"{name} {batch_size} must be divisible by the data-parallel size {dp} "
                     f"(mesh data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']})"
                     + (f" times train.grad_accum {grad_accum}" if grad_accum > 1 else ""))


def process_row_shards(mesh: Mesh, global_batch_size: int,
                       process_index: int | None = None) -> list[tuple[int, int]]:
  """The rows of each global batch that a process's devices hold, as data-pipeline shards.

  Shard (i, n) is rows [i*G/n, (i+1)*G/n) of the global batch (what the data pipeline gives
  "process i of n"). The batch is split into one block per data-parallel position (mesh data x
  fsdp); on real topologies a host's devices need not hold adjacent blocks (e.g. v5p: host 0
  holds blocks 0, 4, 16, 20 of 32), so a process may load several shards. Adjacent aligned
  blocks merge into one shard; a process whose blocks form one aligned run loads one shard.
  Processes whose devices hold the same rows (a tensor axis spanning hosts) load the same
  shards. Sorted by first row.
  """
  pid = jax.process_index() if process_index is None else process_index
  dp = data_parallel_size(mesh)
  if global_batch_size % dp:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"data-parallel size {dp} (mesh data x fsdp)")
  block = global_batch_size // dp
  index_map = batch_sharding(mesh).devices_indices_map((global_batch_size, 1))
  blocks = sorted({(idx[0].start or 0) // block for d, idx in index_map.items()
                   if d.process_index == pid})
  if not blocks:
    raise ValueError(f"process {pid} has no devices in the mesh")
  runs, shards = [[blocks[0], blocks[0] + 1]], []
  for b in blocks[1:]:  # maximal runs of adjacent blocks [lo, hi)
    if b == runs[-1][1]:
      runs[-1][1] = b + 1
    else:
      runs.append([b, b + 1])
  for lo, hi in runs:  # each as the fewest aligned shards: the longest that fits at lo first
    while lo < hi:
      length = max(n for n in range(1, hi - lo + 1) if dp % n == 0 and lo % n == 0)
      shards.append((lo // length, dp // length))
      lo += length
  return shards


def shard_rows(shards: list[tuple[int, int]], global_batch_size: int) -> list[tuple[int, int]]:
  """[(first row, end row)] of each shard in the global batch."""
  return [(i * global_batch_size // n, (i + 1) * global_batch_size // n) for i, n in shards]


def global_batch(local: dict, sharding: NamedSharding, shards: list[tuple[int, int]],
                 global_batch_size: int) -> dict:
  """Global jax.Arrays from this process's rows: `local` holds the shards' rows concatenated
  in `shards` order; each addressable device takes its rows from them."""
  spans, offset = [], 0
  for lo, hi in shard_rows(shards, global_batch_size):
    spans.append((lo, hi, offset))
    offset += hi - lo

  def rows(x, index):
    start = index[0].start or 0
    stop = global_batch_size if index[0].stop is None else index[0].stop
    pieces, at = [], start
    for lo, hi, off in sorted(spans):
      if lo <= at < hi:
        end = min(hi, stop)
        pieces.append(x[(slice(off + at - lo, off + end - lo),) + tuple(index[1:])])
        at = end
    if at != stop:
      raise ValueError(f"rows [{start}, {stop}) of the global batch are not among this "
                       f"process's shards {shards}")
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.shape[0] != offset:
      raise ValueError(f"batch[{k!r}] has {v.shape[0]} rows, this process's shards hold "
                       f"{offset}")
    out[k] = jax.make_array_from_callback((global_batch_size,) + v.shape[1:], sharding,
                                          lambda index, v=v: rows(v, index))
  return out
