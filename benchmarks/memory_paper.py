"""Does the paper's LoopMDM train step fit a TPU slice, with activations sharded? On this CPU.

Compiles the real train step of `experiments/owt.py:loopmdm` (12 x 768, GPT-2 vocabulary,
L = 1024, global batch 512, layers 1-2 looped S ~ U{1..12}, bf16, remat dots_no_batch) with the
TPU compiler for compile-only devices of each topology (`jax.experimental.topologies`; needs the
`libtpu` wheel: `pip install -e '.[tpu]'`) and prints what `loopjax memory` reports: the peak
per chip, whether it fits, and the collectives of the partitioned step, counting those whose
operand spans the global batch (replicated activations). Compile-only: nothing runs.

  python benchmarks/memory_paper.py [--config experiments/owt.py:loopmdm]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices; nothing runs

from common import write_json  # noqa: E402

from loopjax.train.config_load import load_config  # noqa: E402
from loopjax.parallel.topology import tpu_topology_devices  # noqa: E402
from loopjax.train.memory import GIB, memory_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_B = ["--config.model.width=2048", "--config.model.num_layers=16",
         "--config.model.num_heads=16"]
CASES = (  # (topology, mesh, label, overrides)
    ("v5p:2x4x4", {"fsdp": 32}, "170M, as configured", []),
    ("v5p:2x4x4", {"data": 4, "fsdp": 8}, "170M, as configured", []),
    ("v5p:2x4x4", {"fsdp": 32}, "~1B (2048 x 16 layers)", ONE_B),
    ("v5e:2x4", {"fsdp": 8}, "170M, as configured", []),
)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=os.path.join(ROOT, "experiments", "owt.py") + ":loopmdm")
  args = p.parse_args(argv)
  rows = []
  print(f"{'topology':10} {'mesh':14} {'model':24} {'params':>7} {'peak':>8} {'HBM':>5} fits  "
        f"collectives  activation-sized")
  for topo, mesh_cfg, label, overrides in CASES:
    config = load_config(args.config, overrides)
    mesh = {"data": 1, "fsdp": 1, "tensor": 1, **mesh_cfg}
    r = memory_report(config, tpu_topology_devices(topo), mesh)
    r.update(topology=topo, setting=label)
    rows.append(r)
    mesh_s = ",".join(f"{k}={v}" for k, v in mesh_cfg.items())
    if "compiler_error" in r:
      print(f"{topo:10} {mesh_s:14} {label:24} does not fit: the compiler needs "
            f"{r['compiler_needs']}", flush=True)
      continue
    c = r["collectives"]
    print(f"{topo:10} {mesh_s:14} {label:24} {r['param_count'] / 1e6:6.0f}M "
          f"{r['peak_bytes'] / GIB:7.2f}G {r['device_memory'] / GIB:4.0f}G {str(r['fits']):5} "
          f"{c['count']:4d} ({c['bytes'] / GIB:.2f}G)  {len(r['activation_collectives'])}",
          flush=True)
  print("wrote", write_json("memory_paper.json", {"config": args.config, "rows": rows}))


if __name__ == "__main__":
  main()
