"""Does the paper's 170M LoopMDM train step fit a TPU slice? Ahead-of-time, on this CPU.

Compiles the real train step of `experiments/owt.py:loopmdm` (12 x 768, GPT-2 vocabulary,
L = 1024, batch 512, block = layers 1-2 looped S ~ U{1..12}, bf16, remat dots_no_batch) with the
TPU compiler for compile-only devices of each topology (`jax.experimental.topologies`, needs the
`libtpu` wheel matching jax: `pip install libtpu==0.0.42.*` for jax 0.10.2), and prints the
per-device memory `loopjax memory` reports, for a few remat / gradient-accumulation settings.

  python benchmarks/memory_paper.py [--topologies v5e:2x4 v5p:2x2x1]
      [--config experiments/owt.py:loopmdm]
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
from loopjax.train.memory import GIB, memory_report, tpu_topology_devices  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = (  # (label, overrides)
    ("as configured", []),
    ("remat full", ["--config.model.remat=full"]),
    ("remat full, grad_accum 4", ["--config.model.remat=full", "--config.train.grad_accum=4"]),
    ("remat full, grad_accum 16", ["--config.model.remat=full", "--config.train.grad_accum=16"]),
)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=os.path.join(ROOT, "experiments", "owt.py") + ":loopmdm")
  p.add_argument("--topologies", nargs="+", default=["v5e:2x4", "v5p:2x2x1"])
  args = p.parse_args(argv)
  rows = []
  print(f"{'topology':12} {'setting':26} {'params':>8} {'opt':>8} {'temp':>9} {'total':>9} "
        f"{'HBM':>6}  fits")
  for topo in args.topologies:
    devices = tpu_topology_devices(topo)
    for label, overrides in SETTINGS:
      config = load_config(args.config, overrides)
      mesh = {"data": 1, "fsdp": len(devices), "tensor": 1}
      r = memory_report(config, devices, mesh)
      r.update(topology=topo, setting=label)
      rows.append(r)
      if "compiler_error" in r:
        print(f"{topo:12} {label:26} does not fit: the compiler needs {r['compiler_needs']}",
              flush=True)
        continue
      g = lambda k: f"{r[k] / GIB:.2f}G"
      print(f"{topo:12} {label:26} {g('params'):>8} {g('opt_state'):>8} {g('temp'):>9} "
            f"{g('total'):>9} {r.get('device_memory', 0) / GIB:5.0f}G  {r.get('fits')}",
            flush=True)
  print("wrote", write_json("memory_paper.json", {"config": args.config, "rows": rows}))


if __name__ == "__main__":
  main()
