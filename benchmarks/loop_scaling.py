"""Step time vs loop count S for one compiled LoopMDM train step (issue 2 target).

Times the jitted train step (AdamW, EMA, NELBO) at S = 1, 4, 12 with one compilation and prints
the time ratios next to the executed-depth and executed-FLOP ratios. Target: time(S=12)/time(S=1)
within 15% of the FLOP ratio.

  python benchmarks/loop_scaling.py [--width 256 --layers 12 --length 128 --batch 8 --repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import build_step, lm_config, machine, time_step, write_json  # noqa: E402

from loopjax import flops  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--loops", default="1,4,12")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args(argv)
  loops = [int(s) for s in args.loops.split(",")]
  config = lm_config(width=args.width, layers=args.layers, heads=args.heads, vocab=args.vocab,
                     length=args.length, batch=args.batch, loop=(1, 3),
                     loops=f"uniform:1:{max(loops)}", dtype=args.dtype)
  step, state, batch, cfg = build_step(config)
  rows = []
  for s in loops:
    med, times, state = time_step(step, state, batch, s, repeats=args.repeats)
    rows.append(dict(loops=s, seconds=med, all_seconds=times, depth=cfg.executed_depth(s),
                     flops=flops.train_flops_per_step(cfg, args.length, args.batch, s)))
  compiles = step._cache_size()
  base = rows[0]
  print(f"machine: {machine()}")
  print(f"config: width {args.width}, {args.layers} layers, block [1,3), L {args.length}, "
        f"B {args.batch}, {args.dtype}; compilations: {compiles}")
  print(f"{'S':>3} {'step ms':>9} {'time ratio':>10} {'depth ratio':>11} {'FLOP ratio':>10} "
        f"{'time/FLOP':>9}")
  for r in rows:
    tr, dr, fr = r["seconds"] / base["seconds"], r["depth"] / base["depth"], r["flops"] / base["flops"]
    r.update(time_ratio=tr, depth_ratio=dr, flop_ratio=fr)
    print(f"{r['loops']:>3} {1e3 * r['seconds']:>9.1f} {tr:>10.3f} {dr:>11.3f} {fr:>10.3f} "
          f"{tr / fr:>9.3f}")
  last = rows[-1]
  ok = abs(last["time_ratio"] / last["flop_ratio"] - 1) <= 0.15
  print(f"target |time ratio / FLOP ratio - 1| <= 15% at S={last['loops']}: "
        f"{'met' if ok else 'NOT met'} ({last['time_ratio'] / last['flop_ratio'] - 1:+.1%})")
  path = write_json("loop_scaling.json", dict(machine=machine(), args=vars(args),
                                               compilations=compiles, rows=rows, target_met=ok))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
