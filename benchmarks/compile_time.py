"""Compile time of the LoopMDM train step vs S_max, and its compiled memory vs remat policy.

The loop is an nn.scan of static length S_max whose body runs the block under nn.cond, so the
compiled program has one while loop whatever S_max is: compile time should not grow with S_max
(target: S_max = 24 at most 1.2x S_max = 2). Memory: one compiled program serves every S, and
its buffers are sized for S_max (the loop's saved activations are an S_max-long stack), so the
peak memory "at S" is that of the program compiled for S_max = S. Reported from
`compiled.memory_analysis()` for every remat policy, plus the measured peak RSS growth of running
S = 1 and S = S_max through one program.

  python benchmarks/compile_time.py [--smax 2,12,24] [--remat none,full,dots,save_attn_out]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from perf_common import add_model_args  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_args(p)
  p.add_argument("--smax", default="2,12,24")
  p.add_argument("--memory-smax", default="1,12")
  p.add_argument("--remat", default="none,full,dots,save_attn_out")
  p.add_argument("--skip", default="", help="comma list of parts to skip: compile,memory")
  p.add_argument("--repeats", type=int, default=3, help="compilations per S_max (median)")
  args = p.parse_args(argv)

  from common import build_step, kernel_set, lm_config, machine, write_json
  from perf_common import load_average

  def config(smax, remat="none"):
    return lm_config(width=args.width, layers=args.layers, heads=args.heads, vocab=args.vocab,
                     length=args.length, batch=args.batch, loop=(1, 3),
                     loops=f"uniform:1:{smax}" if smax > 1 else "fixed:1", remat=remat,
                     loop_remat=remat)  # one policy for every layer, loop iterations included

  load0 = load_average()
  skip = set(filter(None, args.skip.split(",")))
  print(f"machine: {machine()}; load {load0}")
  print(f"config: width {args.width}, {args.layers} layers, block [1,3), L {args.length}, "
        f"B {args.batch}")
  compile_rows, mem_rows, rss = [], [], []
  if "compile" not in skip:
    compile_rows = compile_times(args, config, build_step)
  if "memory" not in skip:
    mem_rows, rss = memory(args, config, build_step)
  path = write_json("compile_time.json", dict(machine=machine(), args=vars(args),
                                              load=[load0, load_average()], compile=compile_rows,
                                              memory=mem_rows, rss_mib=rss),
                    kernels=kernel_set(config(2).model.kernels))
  print(f"load after: {load_average()}; wrote {path}")


def compile_times(args, config, build_step):
  import jax
  import jax.numpy as jnp
  # Compile time: interleave the S_max values, fresh jit each time (no cache hit).
  smaxes = [int(s) for s in args.smax.split(",")]
  built = {s: build_step(config(s)) for s in smaxes}
  times = {s: [] for s in smaxes}
  for r in range(args.repeats):
    for s in smaxes:
      step, state, batch, _ = built[s]
      jax.clear_caches()
      t = time.perf_counter()
      step.lower(state, batch, jnp.int32(1)).compile()
      times[s].append(time.perf_counter() - t)
  base = statistics.median(times[smaxes[0]])
  print(f"{'S_max':>5} {'compile s':>9} {'vs S_max=' + str(smaxes[0]):>12}   all")
  compile_rows = []
  for s in smaxes:
    med = statistics.median(times[s])
    compile_rows.append(dict(smax=s, compile_s=med, all=times[s], ratio=med / base))
    print(f"{s:>5} {med:>9.2f} {med / base:>12.3f}   {[round(x, 2) for x in times[s]]}")
  last = compile_rows[-1]
  print(f"target compile(S_max={last['smax']}) <= 1.2 x compile(S_max={smaxes[0]}): "
        f"{'met' if last['ratio'] <= 1.2 else 'NOT met'} ({last['ratio']:.3f})")
  return compile_rows


def memory(args, config, build_step):
  import jax
  import jax.numpy as jnp
  # Memory: compiled temp + arguments for each remat policy and S_max.
  mem_rows = []
  msm = [int(s) for s in args.memory_smax.split(",")]
  print("\ncompiled memory (MiB): temp = activations/workspace; args = state + batch")
  print(f"{'remat':>14} " + " ".join(f"{'temp S=' + str(s):>11}" for s in msm)
        + f" {'ratio ' + str(msm[-1]) + '/' + str(msm[0]):>11}")
  for remat in args.remat.split(","):
    temps = []
    for s in msm:
      step, state, batch, _ = build_step(config(s, remat))
      ma = step.lower(state, batch, jnp.int32(1)).compile().memory_analysis()
      temps.append(ma.temp_size_in_bytes)
      mem_rows.append(dict(remat=remat, smax=s, temp_bytes=ma.temp_size_in_bytes,
                           argument_bytes=ma.argument_size_in_bytes,
                           output_bytes=ma.output_size_in_bytes,
                           alias_bytes=ma.alias_size_in_bytes))
    print(f"{remat:>14} " + " ".join(f"{t / 2**20:>11.1f}" for t in temps)
          + f" {temps[-1] / temps[0]:>11.2f}")
  # Measured: peak RSS while running S = 1 and then S = S_max through one program (remat full).
  step, state, batch, _ = build_step(config(msm[-1], "full"))
  rss = []
  for s in (1, msm[-1]):
    state, m = step(state, batch, jnp.int32(s))
    jax.block_until_ready(m)
    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print(f"measured peak RSS (remat full, one program for S_max={msm[-1]}): after S=1 "
        f"{rss[0]:.0f} MiB, after S={msm[-1]} {rss[1]:.0f} MiB (the program's buffers are sized "
        "for S_max whatever S runs)")
  return mem_rows, rss


if __name__ == "__main__":
  main()
