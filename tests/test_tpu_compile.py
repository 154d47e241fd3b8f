"""The real train step compiled by the TPU compiler for a TPU topology, from this CPU host.

libtpu's compile-only devices give the compiler the real chip, so this checks what a TPU run
would get: the kernel set `auto` picks there, that the program fits, and that no collective
moves activations (every collective operand is per-device, none spans the global batch).
"""

import os

import pytest

from loopjax.parallel import mesh as mesh_lib
from loopjax.parallel.topology import have_libtpu, tpu_topology_devices
from loopjax.train import memory
from loopjax.train.config_load import load_config

pytestmark = pytest.mark.skipif(not have_libtpu(),
                                reason="TPU compiles need the libtpu wheel (pip install -e "
                                       "'.[tpu]'); it is in the test extra")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=64", "--config.model.num_layers=3", "--config.model.num_heads=2",
        "--config.model.cond_dim=16", "--config.train.batch_size=16",
        "--config.loops.train=uniform:1:2", "--config.model.dtype=bfloat16"]


def _report(mesh_cfg):
  config = load_config(os.path.join(ROOT, "experiments", "sudoku.py"), TINY)
  return memory.memory_report(config, tpu_topology_devices("v5e:2x2"), mesh_cfg)


def test_tpu_step_uses_the_reference_kernels_and_keeps_activations_sharded():
  r = _report({"data": 1, "fsdp": 4, "tensor": 1})
  assert r["device_kind"].startswith("TPU v5") and r["num_devices"] == 4
  assert r["kernels"] == "splash"  # auto on TPU devices, although this host is a CPU
  assert r["fits"] and 0 < r["peak_bytes"] < 16 * 1024 ** 3
  assert r["collectives"]["count"] > 0  # FSDP gathers the weights layer by layer
  assert r["activation_collectives"] == [], r["activation_collectives"][:4]


def test_the_check_sees_replicated_activations(monkeypatch):
  # Without a batch rule for activations XLA spreads the weights' fsdp sharding onto them and
  # all-reduces whole-batch tensors: the report must say so.
  rules = tuple((k, None if k == "act_batch" else v) for k, v in mesh_lib.LOGICAL_RULES)
  monkeypatch.setattr(mesh_lib, "LOGICAL_RULES", rules)
  r = _report({"data": 1, "fsdp": 4, "tensor": 1})
  assert r["activation_collectives"], "replicated activations went unnoticed"
  assert all(16 in a["shapes"][0] or 16 * 81 in a["shapes"][0] for a in r["activation_collectives"])
