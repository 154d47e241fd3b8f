"""Train-step throughput and MFU for a few sizes and compute dtypes (issue 8, part 5).

Every variant is compiled first; then rounds interleave a burst of the reference float32 matmul
(and a bfloat16 x bfloat16 -> float32 one) with one step of every variant, so all variants and
the peak see the same machine load. Prints, per variant, the median step time, tokens/s,
achieved GFLOP/s (analytic matmul FLOPs, `loopjax.flops`) and four fractions of the float32
matmul peak measured in the same process: median step over median peak; the median over rounds
of each step against its own round's peak burst (pairs measurements taken seconds apart); the
same ratio on process CPU time (robust to other jobs time-slicing the cores); the fastest step
over the fastest peak burst (each at its least disturbed: this host's noise only slows a run
down). For every dtype pair: the speed ratio and the loss curves side by side (same init, same
batches, constant lr so the loss moves).

  python benchmarks/train_throughput.py                       # reference config, f32 and bf16
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
    "ref": (512, 8, 8, 512, 256, 8),    # the reference config
    "wide": (768, 4, 12, 512, 256, 4),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="ref", help=f"comma list of {sorted(SIZES)}, each "
                 "optionally with +unroll and/or +<remat policy>")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--repeats", type=int, default=6)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--glibc-defaults", action="store_true")
  p.add_argument("--json", default="train_throughput.json")
  args = p.parse_args(argv)
  malloc_tuning = ensure_malloc_tuning()

  import jax.numpy as jnp

  from common import build_step, lm_config, machine, write_json
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
      config = lm_config(width=w, layers=n, heads=h, vocab=v, length=length, batch=b, dtype=dt,
                         unroll_layers="unroll" in extras, remat=remat)
      config.train.update(lr_schedule="constant", warmup_steps=0, lr=args.lr)
      step, state, batch, cfg = build_step(config)
      (state, _), compile_s, _ = timed(step, state, batch, jnp.int32(1))  # compile + step 1
      variants[(size, dt)] = dict(step=step, state=state, batch=batch, compile_s=compile_s,
                                  flops=flops.train_flops_per_step(cfg, length, b, 1),
                                  tokens=b * length, times=[], cpu=[], losses=[], round_frac=[])
      print(f"built {size}/{dt}: first call (compile + step) {compile_s:.1f}s", flush=True)
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
  hdr = (f"{'size':>10} {'dtype':>9} {'step s':>7} {'tokens/s':>9} {'GFLOP/s':>8} "
         f"{'frac of f32 peak':>16} {'per round':>9} {'CPU time':>8} {'best/best':>9}")
  print(hdr)
  rows = []
  for (size, dt), d in variants.items():
    med, cmed = statistics.median(d["times"]), statistics.median(d["cpu"])
    row = dict(size=size, dtype=dt, config=SIZES[size.split("+")[0]], step_s=med, steps_s=d["times"],
               cpu_s=d["cpu"], tokens_per_sec=d["tokens"] / med, flops_per_step=d["flops"],
               gflops_per_sec=d["flops"] / med / 1e9,
               frac_of_f32_peak=d["flops"] / med / peak32.median,
               frac_of_f32_peak_cpu_time=d["flops"] / cmed / peak32.median_cpu,
               frac_best_step_of_best_peak=d["flops"] / min(d["times"]) / max(peak32.wall),
               frac_per_round_median=statistics.median(d["round_frac"]),
               frac_per_round=d["round_frac"],
               losses=d["losses"], first_call_s=d["compile_s"])
    rows.append(row)
    print(f"{size:>10} {dt:>9} {med:>7.3f} {row['tokens_per_sec']:>9.0f} "
          f"{row['gflops_per_sec']:>8.1f} {row['frac_of_f32_peak']:>16.3f} "
          f"{row['frac_per_round_median']:>9.3f} {row['frac_of_f32_peak_cpu_time']:>8.3f} "
          f"{row['frac_best_step_of_best_peak']:>9.3f}")
  pairs = []
  for size in args.sizes.split(","):
    dts = [dt for (s, dt) in variants if s == size]
    if "float32" in dts and "bfloat16" in dts:
      a, b = variants[(size, "float32")], variants[(size, "bfloat16")]
      ratio = statistics.median(a["times"]) / statistics.median(b["times"])
      ratio_cpu = statistics.median(a["cpu"]) / statistics.median(b["cpu"])
      per_round = [x / y for x, y in zip(a["times"], b["times"])]
      dl = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
      pairs.append(dict(size=size, bf16_speedup=ratio, bf16_speedup_cpu_time=ratio_cpu,
                        per_round=per_round, max_abs_loss_diff=dl,
                        loss_drop_f32=a["losses"][0] - a["losses"][-1]))
      print(f"{size}: bfloat16 tokens/s / float32 tokens/s = {ratio:.3f} (CPU time {ratio_cpu:.3f};"
            f" per round {[round(x, 2) for x in per_round]})")
      print(f"  losses f32  {[round(x, 4) for x in a['losses']]}")
      print(f"  losses bf16 {[round(x, 4) for x in b['losses']]}  max |diff| {dl:.4f}")
  path = write_json(args.json, dict(machine=machine(), load=loads, malloc_tuning=malloc_tuning,
                                    args=vars(args), peak_f32=peak32.wall,
                                    peak_f32_cpu=peak32.cpu, peak_bf16=peak16.wall, rows=rows,
                                    dtype_pairs=pairs))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
