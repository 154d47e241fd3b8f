"""The real train step compiled by the TPU compiler for a TPU topology, from this CPU host.

libtpu's compile-only devices give the compiler the real chip, so this checks what a TPU run
would get: the kernel set `auto` picks there, that the program fits, and that no collective
moves activations (every collective operand is per-device, none spans the global batch).
"""

import json
import os
import subprocess
import sys

import pytest

from loopjax.parallel import mesh as mesh_lib
from loopjax.parallel import topology, xla_flags
from loopjax.parallel.topology import have_libtpu, tpu_topology_devices
from loopjax.train import memory
from loopjax.config.load import load_config

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
  glob = [a for a in r["activation_collectives"] if a["activation"] == "global"]
  assert glob, "replicated activations went unnoticed"
  assert all(any(16 in d or 16 * 81 in d for d in a["shapes"]) for a in glob)


def _memory_cli(topology, env_flags=None):
  """`loopjax memory --topology` in a fresh process: libtpu reads its flags once per process."""
  env = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  if env_flags is not None:
    env["LIBTPU_INIT_ARGS"] = env_flags
  cmd = [sys.executable, "-m", "loopjax.cli", "memory", "--config",
         os.path.join(ROOT, "experiments", "sudoku.py"), *TINY, "--topology", topology,
         "--mesh", "fsdp=-1", "--json"]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


# The smallest slice of each generation; every one has several chips, so FSDP's all-gathers and
# reduce-scatters (what the overlap flags act on) are in the program.
SMALLEST = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def test_every_generation_compiles_with_its_flags_from_the_table():
  assert set(SMALLEST) == set(xla_flags.TPU_FLAGS)
  # The processes inherit the suite's XLA:CPU flags, which libtpu's flag parser does not know
  # and would abort on: loopjax.parallel.topology keeps them from it.
  assert "--xla_cpu_use_fusion_emitters=false" in os.environ["XLA_FLAGS"]
  for gen, name in SMALLEST.items():
    run = _memory_cli(name)
    assert run.returncode == 0, f"{gen} flags do not compile:\n{run.stderr[-2000:]}"
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["libtpu_init_args"] == xla_flags.flag_string(gen)
    assert xla_flags.generation(r["device_kind"]) == gen
    assert r["fits"] and r["collectives"]["by_op"].get("all-gather", 0) > 0


def test_a_set_the_generation_refuses_fails_the_compile():
  # v5e's continuation fusion of all-gathers is refused on v5p; the environment's
  # LIBTPU_INIT_ARGS (as a launcher would export them) win over the table and are reported.
  run = _memory_cli(SMALLEST["v5p"], env_flags=xla_flags.flag_string("v5e"))
  assert run.returncode != 0
  assert "Continuation fusion for AllGather" in run.stderr


def test_flags_cannot_change_once_libtpu_is_loaded(monkeypatch):
  # libtpu applies the flags it read at load time to every later compile: asking for another
  # generation's set in the same process is refused, not silently ignored.
  monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
  tpu_topology_devices("v5e:2x2")  # loads libtpu in this process if nothing has yet
  loaded = topology.libtpu_flags() or ""
  gen = next(g for g in SMALLEST if xla_flags.flag_string(g) != loaded)
  with pytest.raises(ValueError, match="fresh process"):
    topology.set_libtpu_flags(SMALLEST[gen])
  assert "LIBTPU_INIT_ARGS" not in os.environ
