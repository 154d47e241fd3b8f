"""Per-host input on real TPU device orders: each process loads exactly the rows its devices hold.

The device-to-process maps come from libtpu's compile-only topologies (no TPU needed); the mesh
layout is the one the trainer builds (`mesh.make_mesh`).
"""

import jax
import numpy as np
import pytest

from loopjax.data.process_rows import make_shards_iterator
from loopjax.parallel import mesh as mesh_lib
from loopjax.parallel.topology import have_libtpu, tpu_topology_devices

needs_libtpu = pytest.mark.skipif(not have_libtpu(),
                                  reason="TPU device orders need the libtpu wheel (pip install "
                                         "-e '.[tpu]')")

# The meshes README and launch/README.md suggest, and a few more splits.
MESHES = [{"data": -1}, {"fsdp": -1}, {"data": 4, "fsdp": -1}, {"data": 2, "fsdp": -1},
          {"data": 8, "fsdp": 4}, {"fsdp": 8, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": -1},
          {"fsdp": -1, "tensor": 2}]


def _held_rows(mesh, batch, pid):
  """Global rows the devices of process `pid` hold, read off the batch sharding itself."""
  rows = set()
  for d, idx in mesh_lib.batch_sharding(mesh).devices_indices_map((batch, 1)).items():
    if d.process_index == pid:
      rows.update(range(idx[0].start or 0, batch if idx[0].stop is None else idx[0].stop))
  return rows


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p:2x4x4", "v4:2x2x4", "v5e:4x4"])
@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_each_process_loads_exactly_the_rows_its_devices_hold(topology, mesh_cfg):
  devices = tpu_topology_devices(topology)
  try:
    mesh = mesh_lib.make_mesh(mesh_cfg, devices)
  except ValueError as e:  # a split that does not divide this topology's chips
    pytest.skip(str(e))
  batch = 4 * mesh_lib.data_parallel_size(mesh)
  processes = sorted({d.process_index for d in devices})
  assert len(processes) > 1
  covered = set()
  for pid in processes:
    shards = mesh_lib.process_row_shards(mesh, batch, pid)
    spans = mesh_lib.shard_rows(shards, batch)
    loaded = [r for lo, hi in spans for r in range(lo, hi)]
    assert len(loaded) == len(set(loaded)), f"process {pid} loads a row twice: {shards}"
    assert set(loaded) == _held_rows(mesh, batch, pid), f"process {pid}: shards {shards}"
    covered |= set(loaded)
  assert covered == set(range(batch))


def test_aligned_adjacent_blocks_merge_into_one_shard():
  devs = jax.devices()[:1]
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devs)
  assert mesh_lib.process_row_shards(mesh, 8) == [(0, 1)]


def test_global_batch_puts_every_shard_where_it_belongs():
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  sharding = mesh_lib.batch_sharding(mesh)
  full = np.arange(8 * 3).reshape(8, 3)
  # This process's rows as shards 3 and 1 of 4, in that order: rows 6-7 then rows 2-3. The
  # assembly must put them back at their global rows (here: the single device asks for all
  # rows, which these shards do not cover, so it must refuse).
  local = {"tokens": np.concatenate([full[6:8], full[2:4]])}
  with pytest.raises(ValueError, match="not among this process's shards"):
    mesh_lib.global_batch(local, sharding, [(3, 4), (1, 4)], 8)
  # All four shards in a scrambled order: the global array is the original batch.
  order = [(2, 4), (0, 4), (3, 4), (1, 4)]
  local = {"tokens": np.concatenate([full[2 * i:2 * i + 2] for i, _ in order])}
  out = mesh_lib.global_batch(local, sharding, order, 8)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), full)


def test_shards_iterator_reads_the_one_process_rows_and_resumes():
  from loopjax import data as D
  cfg = D.default_data_config()
  cfg.update(source="sudoku", seq_len=81)
  whole = D.make_train_iterator(cfg, global_batch_size=8, seed=0)
  parts = make_shards_iterator(cfg, global_batch_size=8, seed=0, shards=[(3, 4), (0, 4)])
  for _ in range(2):
    a, b = next(whole), next(parts)
    np.testing.assert_array_equal(b["tokens"], np.concatenate([a["tokens"][6:8],
                                                               a["tokens"][0:2]]))
  state = parts.get_state()
  expected = next(parts)
  again = make_shards_iterator(cfg, global_batch_size=8, seed=0, shards=[(3, 4), (0, 4)])
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["tokens"], expected["tokens"])
  with pytest.raises(ValueError, match="holds 2 shard state"):
    make_shards_iterator(cfg, global_batch_size=8, seed=0,
                         shards=[(0, 4), (1, 4), (2, 4)]).set_state(state)
  for it in (whole, parts, again):
    it.close()


@needs_libtpu
@pytest.mark.parametrize("mesh_cfg", [{"fsdp": -1}, {"data": -1}, {"data": 2, "fsdp": -1},
                                      {"data": 1, "fsdp": 2, "tensor": 2}])
def test_one_host_loads_the_whole_batch_as_one_shard(mesh_cfg):
  mesh = mesh_lib.make_mesh(mesh_cfg, tpu_topology_devices("v5e:2x2"))  # 4 chips, one host
  assert mesh_lib.process_row_shards(mesh, 16, 0) == [(0, 1)]


def test_row_runs_split_into_the_fewest_aligned_shards():
  # 8 blocks on one host of a fake 8-device mesh: one shard, not (0, 4) + (2, 8) + ...
  from types import SimpleNamespace

  class Device:  # hashable, as jax devices are
    def __init__(self, i):
      self.id, self.process_index = i, 0

  devs = [Device(i) for i in range(8)]
  grid = np.asarray(devs, dtype=object).reshape(1, 8, 1)
  mesh = SimpleNamespace(shape={"data": 1, "fsdp": 8, "tensor": 1}, devices=grid)
  index_map = {d: (slice(2 * i, 2 * i + 2), slice(None)) for i, d in enumerate(devs)}
  sharding = SimpleNamespace(devices_indices_map=lambda shape: index_map)
  orig = mesh_lib.batch_sharding
  try:
    mesh_lib.batch_sharding = lambda m: sharding
    assert mesh_lib.process_row_shards(mesh, 16, 0) == [(0, 1)]
    for d in devs[3:]:  # this process holds blocks 0-2: (0, 4) then (2, 8)
      d.process_index = 1
    assert mesh_lib.process_row_shards(mesh, 16, 0) == [(0, 4), (2, 8)]
    assert mesh_lib.process_row_shards(mesh, 16, 1) == [(3, 8), (1, 2)]
  finally:
    mesh_lib.batch_sharding = orig
