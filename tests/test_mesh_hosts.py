"""Multi-node GPU meshes: which devices share a node decides what crosses the slow network."""

from types import SimpleNamespace

import pytest

from loopjax.parallel import mesh as mesh_lib


def _gpus(num_nodes, procs_per_node, gpus_per_proc):
  """Fake GPUs as SLURM numbers them: a node's processes have consecutive ranks."""
  out = []
  for node in range(num_nodes):
    for p in range(procs_per_node):
      for g in range(gpus_per_proc):
        out.append(SimpleNamespace(id=len(out), platform="fake", device_kind="fake",
                                   process_index=node * procs_per_node + p, node=node))
  return out


@pytest.mark.parametrize("procs_per_node,gpus_per_proc", [(1, 8), (8, 1), (4, 2)])
def test_dcn_data_spans_nodes_whatever_the_processes_per_node(procs_per_node, gpus_per_proc):
  devs = _gpus(2, procs_per_node, gpus_per_proc)
  grid = mesh_lib.device_grid({"data": -1, "fsdp": 8, "tensor": 1, "dcn_data": 2}, devs)
  assert grid.shape == (2, 8, 1)
  # Each data row is one node: fsdp's all-gathers stay on NVLink, only data crosses nodes.
  assert [{d.node for d in row.ravel()} for row in grid] == [{0}, {1}]
  assert sorted(d.id for d in grid.ravel()) == list(range(16))


def test_dcn_fsdp_across_nodes_and_tensor_inside():
  devs = _gpus(4, 8, 1)
  grid = mesh_lib.device_grid({"data": 2, "fsdp": 8, "tensor": 2, "dcn_data": 2, "dcn_fsdp": 2},
                              devs)
  assert grid.shape == (2, 8, 2)
  for d in range(2):
    for f in range(8):
      assert len({x.node for x in grid[d, f].ravel()}) == 1  # tensor pairs share a node


def test_dcn_that_does_not_match_the_nodes_is_refused():
  devs = _gpus(2, 1, 8)
  with pytest.raises(ValueError, match="multiply to 4 but the devices form 2"):
    mesh_lib.device_grid({"data": -1, "dcn_data": 4}, devs)
