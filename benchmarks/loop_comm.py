"""Collectives inside the looped block's S_max loop, per-chip peak and collective bytes of the
paper step compiled for a TPU topology (compile-only, needs the libtpu wheel).

    python benchmarks/loop_comm.py --mesh fsdp=32 [--topology v5p:2x4x4] [--config ...]
        [--out results/loop_comm_fsdp32.json] [--hlo-out step.hlo] [--config.model.X=Y ...]

"In loop" is `loopjax.parallel.hlo.collectives`' `in_loop`: a collective in a computation the
looped block's `while` body reaches (through calls, fusions, async wrappers, the cond's
branches, nested scans), which runs once per iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv) -> int:
  from loopjax.config.load import load_config, split_config_args
  spec, overrides, rest = split_config_args(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mesh", required=True)
  p.add_argument("--topology", default="v5p:2x4x4")
  p.add_argument("--out", default=None)
  p.add_argument("--hlo-out", default=None)
  args = p.parse_args(rest)
  import jax
  jax.config.update("jax_platforms", "cpu")
  from loopjax.parallel import hlo
  from loopjax.parallel import mesh as mesh_lib
  from loopjax.parallel.topology import tpu_topology_devices
  from loopjax.train.memory import compile_train_step, parse_mesh, _optimized_hlo
  config = load_config(spec or "experiments/owt.py:loopmdm", overrides)
  devices = tpu_topology_devices(args.topology)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **parse_mesh(args.mesh)},
                            devices)
  dump = tempfile.mkdtemp(prefix="loopjax_hlo_")
  try:
    compiled, program = compile_train_step(config, mesh, dump)
    text = _optimized_hlo(compiled, dump)
  finally:
    shutil.rmtree(dump, ignore_errors=True)
  if args.hlo_out:
    with open(args.hlo_out, "w", encoding="utf-8") as f:
      f.write(text)
  m = compiled.memory_analysis()
  colls = hlo.collectives(text)
  inloop = [c for c in colls if c["in_loop"]]
  by_op = {}
  for c in inloop:
    by_op[c["op"]] = by_op.get(c["op"], 0) + 1
  in_bytes = sum(c["bytes"] for c in inloop)
  from common import git_commit
  report = {"commit": git_commit(), "topology": args.topology, "mesh": args.mesh,
            "kernels": {"configured": config.model.kernels,
                        "resolved": program.model.cfg.kernels},
            "overrides": overrides,
            "peak_gib": round(int(m.peak_memory_in_bytes) / 2 ** 30, 3),
            "collectives": len(colls), "collective_bytes": sum(c["bytes"] for c in colls),
            "in_loop": len(inloop), "in_loop_by_op": by_op, "in_loop_bytes": in_bytes}
  print(json.dumps(report, indent=1))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
