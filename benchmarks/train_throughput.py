"""Train-step throughput and MFU for a few sizes, compute dtypes and kernel sets.

A variant is a (size, dtype, model.kernels) triple. Every variant is compiled first; then rounds
interleave a burst of the reference float32 matmul (and a bfloat16 x bfloat16 -> float32 one)
with one step of every variant, so all variants and the peak see the same machine load. Prints,
per variant, the median step time, tokens/s, achieved GFLOP/s (analytic matmul FLOPs,
`loopjax.flops`) and four fractions of the float32 matmul peak measured in the same process:
median step over median peak; the median over rounds of each step against its own round's peak
burst (pairs measurements taken seconds apart); the same ratio on process CPU time (robust to
other jobs time-slicing the cores); the fastest step over the fastest peak burst (each at its
least disturbed: this host's noise only slows a run down). For every dtype pair: the speed ratio
and the loss curves side by side (same init, same batches, constant lr so the loss moves); for
every kernel pair: the speed of xla_cpu over reference.

  python benchmarks/train_throughput.py        # reference config, f32 and bf16, both kernel sets
  python benchmarks/train_throughput.py --sizes small --kernels xla_cpu --repeats 2
  python benchmarks/train_throughput.py --sizes small,ref --dtypes float32 --repeats 7
  python benchmarks/train_throughput.py --glibc-defaults     # no malloc tuning (see perf_common)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from perf_common import ensure_malloc_tuning  # noqa: E402

SIZES = {  # name: (width, layers, heads, vocab, length, batch)
    "small": (256, 4, 4, 512, 128, 8),
    "ref": (512, 8, 8, 512, 256, 8),    # the reference config of BENCHMARKS.md
    "wide": (768, 4, 12, 512, 256, 4),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="ref", help=f"comma list of {sorted(SIZES)}, each "
                 "optionally with +unroll and/or +<remat policy>")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--kernels", default="reference,xla_cpu", help="comma list of model.kernels")
  p.add_argument("--repeats", type=int, default=6)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--glibc-defaults", action="store_true")
  p.add_argument("--json", default="train_throughput.json")
  args = p.parse_args(argv)
  malloc_tuning = ensure_malloc_tuning()

  import jax.numpy as jnp

  from common import build_step, kernel_set, lm_config, machine, write_json
  from loopjax import flops
  from perf_common import MatmulPeak, load_average, timed

  variants = {}
  for size in args.sizes.split(","):
    # "NAME+unroll": the same size with model.unroll_layers=True (layer scans unrolled: no
    # stacked per-layer activations to write and slice, longer compile); "NAME+<policy>": with
    # model.remat=<policy> (full, dots, ...). Suffixes combine: ref+unroll+dots.
    base_size, *extras = size.split("+")
    w, n, h, v, length, b = SIZES[base_size]
    remat = next((e for e in extras if e != "unroll"), "none")
    for dt in args.dtypes.split(","):
      for kern in args.kernels.split(","):
        config = lm_config(width=w, layers=n, heads=h, vocab=v, length=length, batch=b, dtype=dt,
                           unroll_layers="unroll" in extras, remat=remat, kernels=kern)
        config.train.update(lr_schedule="constant", warmup_steps=0, lr=args.lr)
        step, state, batch, cfg = build_step(config)
        (state, _), compile_s, _ = timed(step, state, batch, jnp.int32(1))  # compile + step 1
        variants[(size, dt, kern)] = dict(
            step=step, state=state, batch=batch, compile_s=compile_s,
            flops=flops.train_flops_per_step(cfg, length, b, 1), tokens=b * length, times=[],
            cpu=[], losses=[], round_frac=[])
        print(f"built {size}/{dt}/{kern}: first call (compile + step) {compile_s:.1f}s",
              flush=True)
  peak32, peak16 = MatmulPeak(dtype="float32"), MatmulPeak(dtype="bfloat16")
  keys = list(variants)
  loads = [load_average()]
  for r in range(args.repeats):
    peak32.measure()
    peak16.measure()
    for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order every round
      d = variants[key]
      (d["state"], m), wall, cpu = timed(d["step"], d["state"], d["batch"], jnp.int32(1))
      d["times"].append(wall)
      d["round_frac"].append(d["flops"] / wall / peak32.wall[-1])  # against this round's peak
      d["cpu"].append(cpu)
      d["losses"].append(float(m["loss"]))
  loads.append(load_average())

  print(f"\nmachine: {machine()}; load average before/after: {loads[0]} / {loads[1]}; "
        f"malloc tuning: {'on' if malloc_tuning else 'off (glibc defaults)'}")
  print(f"float32 {peak32.n}^3 matmul peak, median of {len(peak32.wall)} bursts: "
        f"{peak32.median / 1e9:.1f} GFLOP/s wall, {peak32.median_cpu / 1e9:.1f} GFLOP per CPU-s "
        f"(bursts {[round(x / 1e9) for x in peak32.wall]})")
  print(f"bfloat16 x bfloat16 -> float32 matmul: {peak16.median / 1e9:.1f} GFLOP/s wall "
        f"({peak16.median / peak32.median:.2f}x float32)")
  hdr = (f"{'size':>10} {'dtype':>9} {'kernels':>9} {'step s':>7} {'tokens/s':>9} {'GFLOP/s':>8} "
         f"{'frac of f32 peak':>16} {'per round':>9} {'CPU time':>8} {'best/best':>9}")
  print(hdr)
  rows = []
  for (size, dt, kern), d in variants.items():
    med, cmed = statistics.median(d["times"]), statistics.median(d["cpu"])
    row = dict(size=size, dtype=dt, kernels=kern, config=SIZES[size.split("+")[0]], step_s=med,
               steps_s=d["times"], cpu_s=d["cpu"], tokens_per_sec=d["tokens"] / med,
               flops_per_step=d["flops"],
               gflops_per_sec=d["flops"] / med / 1e9,
               frac_of_f32_peak=d["flops"] / med / peak32.median,
               frac_of_f32_peak_cpu_time=d["flops"] / cmed / peak32.median_cpu,
               frac_best_step_of_best_peak=d["flops"] / min(d["times"]) / max(peak32.wall),
               frac_per_round_median=statistics.median(d["round_frac"]),
               frac_per_round=d["round_frac"],
               losses=d["losses"], first_call_s=d["compile_s"])
    rows.append(row)
    print(f"{size:>10} {dt:>9} {kern:>9} {med:>7.3f} {row['tokens_per_sec']:>9.0f} "
          f"{row['gflops_per_sec']:>8.1f} {row['frac_of_f32_peak']:>16.3f} "
          f"{row['frac_per_round_median']:>9.3f} {row['frac_of_f32_peak_cpu_time']:>8.3f} "
          f"{row['frac_best_step_of_best_peak']:>9.3f}")
  def speedup(a, b):  # b's speed over a's: median ratios of wall and CPU time, per round
    return dict(speedup=statistics.median(a["times"]) / statistics.median(b["times"]),
                speedup_cpu_time=statistics.median(a["cpu"]) / statistics.median(b["cpu"]),
                per_round=[x / y for x, y in zip(a["times"], b["times"])])

  pairs, kernel_pairs = [], []
  for size in args.sizes.split(","):
    for kern in args.kernels.split(","):
      a, b = variants.get((size, "float32", kern)), variants.get((size, "bfloat16", kern))
      if a is None or b is None:
        continue
      dl = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
      r = speedup(a, b)
      pairs.append(dict(size=size, kernels=kern, bf16_speedup=r["speedup"],
                        bf16_speedup_cpu_time=r["speedup_cpu_time"], per_round=r["per_round"],
                        max_abs_loss_diff=dl, loss_drop_f32=a["losses"][0] - a["losses"][-1]))
      print(f"{size}/{kern}: bfloat16 tokens/s / float32 tokens/s = {r['speedup']:.3f} (CPU time "
            f"{r['speedup_cpu_time']:.3f}; per round {[round(x, 2) for x in r['per_round']]})")
      print(f"  losses f32  {[round(x, 4) for x in a['losses']]}")
      print(f"  losses bf16 {[round(x, 4) for x in b['losses']]}  max |diff| {dl:.4f}")
    for dt in args.dtypes.split(","):
      a, b = variants.get((size, dt, "reference")), variants.get((size, dt, "xla_cpu"))
      if a is None or b is None:
        continue
      r = speedup(a, b)
      kernel_pairs.append(dict(size=size, dtype=dt, xla_cpu_speedup=r["speedup"],
                               xla_cpu_speedup_cpu_time=r["speedup_cpu_time"],
                               per_round=r["per_round"]))
      print(f"{size}/{dt}: xla_cpu tokens/s / reference tokens/s = {r['speedup']:.3f} (CPU time "
            f"{r['speedup_cpu_time']:.3f}; per round {[round(x, 2) for x in r['per_round']]})")
  path = write_json(args.json, dict(machine=machine(), load=loads, malloc_tuning=malloc_tuning,
                                    args=vars(args), peak_f32=peak32.wall,
                                    peak_f32_cpu=peak32.cpu, peak_bf16=peak16.wall, rows=rows,
                                    dtype_pairs=pairs, kernel_pairs=kernel_pairs),
                    kernels=[kernel_set(k) for k in args.kernels.split(",")])
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
