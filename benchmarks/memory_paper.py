"""Does the paper's LoopMDM train step fit a TPU slice, with activations sharded? On this CPU.

Compiles the real train step of `experiments/owt.py:loopmdm` (12 x 768, GPT-2 vocabulary,
L = 1024, global batch 512, layers 1-2 looped S ~ U{1..12}, bf16, remat dots_no_batch) with the
TPU compiler for compile-only devices of each topology (`jax.experimental.topologies`; needs the
`libtpu` wheel: `pip install -e '.[tpu]'`) and prints what `loopjax memory` reports: the peak
per chip, whether it fits, and the collectives of the partitioned step, counting those whose
operand spans the global batch (replicated activations). Compile-only: nothing runs.

Also the ~1B and ~7B variants of experiments/owt_scale.py on v5p-64 / v5p-128, and for every
row the collective report (bytes per step, in the loop, synchronous) and the roofline bound
(`loopjax memory`'s `roofline`: step-time lower bound, MFU upper bound, exposed communication).

  python benchmarks/memory_paper.py [--config experiments/owt.py:loopmdm] [--cases 0,4,5]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices; nothing runs

from common import kernel_set, write_json  # noqa: E402

from loopjax.config.load import load_config  # noqa: E402
from loopjax.parallel.topology import tpu_topology_devices  # noqa: E402
from loopjax.train.memory import GIB, memory_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = os.path.join(ROOT, "experiments", "owt_scale.py")
CASES = (  # (topology, mesh, label, config (None: --config), overrides)
    ("v5p:2x4x4", {"fsdp": 32}, "170M, as configured", None, []),
    ("v5p:2x4x4", {"data": 2, "fsdp": 4, "tensor": 4}, "170M, as configured", None, []),
    ("v5p:2x4x4", {"data": 4, "fsdp": 8}, "170M, as configured", None, []),
    ("v5e:2x4", {"fsdp": 8}, "170M, as configured", None, []),
    ("v5p:2x4x4", {"fsdp": 32}, "~1B (owt_scale loopmdm_1b)", SCALE + ":loopmdm_1b", []),
    ("v5p:4x4x4", {"fsdp": 64}, "~7B (owt_scale loopmdm_7b)", SCALE + ":loopmdm_7b", []),
)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=os.path.join(ROOT, "experiments", "owt.py") + ":loopmdm")
  p.add_argument("--cases", default="",
                  help="comma-separated indices into CASES to run (default: all)")
  args = p.parse_args(argv)
  cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
  rows = []
  print(f"{'topology':10} {'mesh':14} {'model':28} {'params':>7} {'peak':>8} {'HBM':>5} fits  "
        f"collectives (per step, in loop)  activation-sized  step >= ms  MFU <=  exposed")
  for topo, mesh_cfg, label, spec, overrides in cases:
    config = load_config(spec or args.config, overrides)
    mesh = {"data": 1, "fsdp": 1, "tensor": 1, **mesh_cfg}
    r = memory_report(config, tpu_topology_devices(topo), mesh)
    r.update(topology=topo, setting=label, config=spec or args.config)
    rows.append(r)
    r["kernels"] = kernel_set(config.model.kernels, tpu_topology_devices(topo))
    write_json("memory_paper.json", {"config": args.config, "rows": rows},  # row by row
               kernels="per row (rows[*].kernels)")
    mesh_s = ",".join(f"{k}={v}" for k, v in mesh_cfg.items())
    if "compiler_error" in r:
      print(f"{topo:10} {mesh_s:14} {label:28} does not fit: the compiler needs "
            f"{r['compiler_needs']}", flush=True)
      continue
    c, rl = r["collectives"], r["roofline"] or {}
    print(f"{topo:10} {mesh_s:14} {label:28} {r['param_count'] / 1e6:6.0f}M "
          f"{r['peak_bytes'] / GIB:7.2f}G {r['device_memory'] / GIB:4.0f}G {str(r['fits']):5} "
          f"{c['count']:4d} ({c['bytes'] / GIB:.2f}G, {c['in_loop']['count']} in loop "
          f"{c['in_loop']['bytes'] / GIB:.2f}G)  {len(r['activation_collectives'])}  "
          f"{rl.get('step_s_lower_bound', float('nan')) * 1e3:.1f}  "
          f"{rl.get('mfu_upper_bound', float('nan')):.3f}  "
          f"{rl.get('exposed_comm_share', float('nan')):.3f}", flush=True)
  print("wrote", write_json("memory_paper.json", {"config": args.config, "rows": rows},
                           kernels="per row (rows[*].kernels)"))


if __name__ == "__main__":
  main()
