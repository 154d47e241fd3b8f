"""Step time vs S through one compiled LoopMDM train step, S values interleaved round by round
(robust to a shared host, unlike timing each S in a block), for several remat policies.

Prints time(S)/time(1) next to the ratio of useful FLOPs (what MFU counts) and of executed
FLOPs (useful + rematerialised, `loopjax.flops.remat_overhead_flops_per_seq`).

  python benchmarks/loop_time.py [--remat none:none,none:full --loops 1,4,12 --repeats 5]

--remat lists LAYERS:LOOP pairs: model.remat (head/tail layers) and model.loop_remat (each loop
iteration); a single name sets both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from perf_common import add_model_args, ensure_malloc_tuning  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_args(p)
  p.add_argument("--loops", default="1,4,12")
  p.add_argument("--remat", default="none:none,none:full")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--glibc-defaults", action="store_true")
  args = p.parse_args(argv)
  ensure_malloc_tuning()

  import jax.numpy as jnp

  from common import build_step, kernel_set, lm_config, machine, write_json
  from loopjax import flops
  from perf_common import load_average, timed

  loops = [int(s) for s in args.loops.split(",")]
  runs = {}
  for remat in args.remat.split(","):
    layers_remat, _, loop_remat = remat.partition(":")
    config = lm_config(width=args.width, layers=args.layers, heads=args.heads, vocab=args.vocab,
                       length=args.length, batch=args.batch, loop=(1, 3),
                       loops=f"uniform:1:{max(loops)}", remat=layers_remat,
                       loop_remat=loop_remat or layers_remat)
    step, state, batch, cfg = build_step(config)
    for s in loops:
      (state, _), _, _ = timed(step, state, batch, jnp.int32(s))
    runs[remat] = dict(step=step, state=state, batch=batch, cfg=cfg, loops=loops,
                       times={s: [] for s in loops})
    # The same model compiled for S_max = 1: what S = 1 costs without the S_max-long loop.
    config.loops.train = "fixed:1"
    step, state, batch, _ = build_step(config)
    (state, _), _, _ = timed(step, state, batch, jnp.int32(1))
    runs[remat + "@smax1"] = dict(step=step, state=state, batch=batch, loops=[1], times={1: []})
  load0 = load_average()
  for r in range(args.repeats):
    for remat, d in runs.items():
      ls = d["loops"]
      order = ls[r % len(ls):] + ls[:r % len(ls)]
      for s in order:
        (d["state"], _), wall, _ = timed(d["step"], d["state"], d["batch"], jnp.int32(s))
        d["times"][s].append(wall)
  print(f"machine: {machine()}; load {load0} -> {load_average()}")
  print(f"config: width {args.width}, {args.layers} layers, block [1,3), L {args.length}, "
        f"B {args.batch}, S_max {max(loops)}, float32; S interleaved, median of {args.repeats}")
  print(f"{'remat':>10} {'S':>3} {'step ms':>8} {'time ratio':>10} {'useful FLOP ratio':>17} "
        f"{'executed FLOP ratio':>19} {'time/useful':>11}")
  rows = []
  for remat, d in runs.items():
    if remat.endswith("@smax1"):
      continue
    cfg, b, length = d["cfg"], args.batch, args.length
    useful = {s: flops.train_flops_per_step(cfg, length, b, s) for s in loops}
    executed = {s: useful[s] + b * flops.remat_overhead_flops_per_seq(cfg, length, s)
                for s in loops}
    t1 = statistics.median(d["times"][loops[0]])
    for s in loops:
      t = statistics.median(d["times"][s])
      row = dict(remat=remat, loops=s, seconds=t, all=d["times"][s], time_ratio=t / t1,
                 useful_flop_ratio=useful[s] / useful[loops[0]],
                 executed_flop_ratio=executed[s] / executed[loops[0]])
      rows.append(row)
      print(f"{remat:>10} {s:>3} {t * 1e3:>8.1f} {row['time_ratio']:>10.3f} "
            f"{row['useful_flop_ratio']:>17.3f} {row['executed_flop_ratio']:>19.3f} "
            f"{row['time_ratio'] / row['useful_flop_ratio']:>11.3f}")
  for remat, d in runs.items():
    if remat.endswith("@smax1"):
      t, t1 = (statistics.median(d["times"][1]),
               statistics.median(runs[remat[:-len("@smax1")]]["times"][loops[0]]))
      rows.append(dict(remat=remat, loops=1, seconds=t, all=d["times"][1]))
      print(f"{remat[:-6]:>10}: S=1 in an S_max=1 program {t * 1e3:.1f} ms; the S_max={max(loops)} "
            f"program at S={loops[0]} takes {t1 / t:.3f}x that")
  path = write_json("loop_time.json", dict(machine=machine(), args=vars(args), rows=rows),
                    kernels=kernel_set(config.model.kernels))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
