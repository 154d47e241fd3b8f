"""Adaptive loops vs fixed S_max vs time schedules: wall time, executed FLOPs and accuracy.

On a trained Sudoku run (the README's first command trains one), decodes the held-out puzzles
with greedy confidence decoding (one cell per model call, `loopjax.evaluate.tasks`) under every
loop policy, and reports per policy: cell accuracy, loops per model call and inference FLOPs per
sample both per sequence (what each sequence's result took) and executed (what the batch ran:
its slowest sequence's loops at every call), and the median wall time and process CPU time of
the whole decode (after compilation; rounds interleaved, order rotated), with ratios to fixed
S = S_max. CPU seconds are the steadier figure on a shared host: other jobs stretch wall time.

A "time" schedule calibrated on the first adaptive policy is added (`loops.time_table`:
the mean loops that policy spent in each of K bins of t): every sequence of a call runs the same
S, so its executed compute is its per-sequence compute.

  python benchmarks/adaptive_loops.py --workdir runs/sudoku \\
      [--policies 6,2,adaptive:0.1,adaptive:0.03] [--bins 5] [--examples 128] [--batch 64]
      [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from perf_common import ensure_malloc_tuning, load_average  # noqa: E402


def decode(model, params, batches, policy, steps, seed=0):
  """(outputs, wall seconds, process CPU seconds) of one greedy confidence decode of every batch
  under `policy` (compilation excluded: `timed` compiles once per program and shape)."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np

  from loopjax.inference.denoiser import loop_args, make_sampler, timed

  cfg = model.cfg
  fn = make_sampler(model, policy, steps=steps, method="confidence")
  outs, seconds, cpu = [], 0.0, 0.0
  for k, b in enumerate(batches):
    x = np.where(np.asarray(b["loss_mask"], bool), cfg.mask_id, b["tokens"])
    c0 = time.process_time()
    out, secs, _ = timed(fn, params, jax.random.PRNGKey(seed + k), jnp.asarray(x, jnp.int32),
                         jnp.asarray(b["segment_ids"]), loop_args(policy))
    cpu += time.process_time() - c0
    outs.append(jax.device_get(out))
    seconds += secs
  return outs, seconds, cpu


def summarize(cfg, batches, outs, source):
  """Accuracy and per-sequence / executed compute of one decode (rows-weighted over batches)."""
  import numpy as np

  from loopjax.inference.denoiser import generation_stats
  from loopjax.evaluate.tasks import score

  length = np.shape(batches[0]["tokens"])[1]
  stats = [generation_stats(cfg, length, o) for o in outs]
  w = [len(b["tokens"]) for b in batches]
  avg = lambda k: float(np.average([s[k] for s in stats], weights=w))
  cat = lambda key: np.concatenate([np.asarray(b[key]) for b in batches])
  acc = score(source, np.concatenate([np.asarray(o["tokens"]) for o in outs]), cat("tokens"),
              cat("fixed").astype(bool), cat("loss_mask").astype(bool))
  return {**acc, **{k: avg(k) for k in ("loops_mean", "executed_loops_mean", "flops_per_sample",
                                        "executed_flops_per_sample")}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a trained Sudoku run (or export)")
  p.add_argument("--policies", default="", help="comma list of loop specs (default: S_max, "
                 "2, adaptive:0.1, adaptive:0.03); a time:... table is taken whole")
  p.add_argument("--bins", type=int, default=5, help="bins of the calibrated time schedule")
  p.add_argument("--examples", type=int, default=128)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--glibc-defaults", action="store_true")
  args = p.parse_args(argv)
  if not args.glibc_defaults:
    ensure_malloc_tuning()

  import numpy as np

  from common import kernel_set, machine, write_json
  from loopjax.loops import time_table
  from loopjax.loops import split_specs as parse_loops
  from loopjax.evaluate.tasks import default_steps, heldout_batches
  from loopjax.io.load import load_model_dir

  loaded = load_model_dir(args.workdir)
  config, model, params = loaded.config, loaded.model, loaded.params
  cfg, source = model.cfg, config.data.source
  s_max = cfg.max_loops
  specs = (parse_loops([args.policies]) if args.policies
           else [str(s_max), "2", "adaptive:0.1", "adaptive:0.03"])
  if str(s_max) not in specs:
    specs.insert(0, str(s_max))
  batches = heldout_batches(loaded.data, args.examples, batch_size=args.batch,
                            seed=int(config.get("train", {}).get("seed", 0)) + 1)
  steps = default_steps(batches)
  load0 = load_average()

  policies = {s: loaded.policy(s) for s in specs}
  results, calibrated = {}, False
  for s, pol in list(policies.items()):  # compile + warm; derive the calibrated schedule
    outs, _, _ = decode(model, params, batches, pol, steps)
    results[s] = summarize(cfg, batches, outs, source)
    if pol.kind == "adaptive" and not calibrated:
      calibrated = True
      loops_TxB = np.concatenate([np.asarray(o["loops_TxB"]) for o in outs], axis=1)
      spec = time_table(loops_TxB, args.bins)
      policies[spec] = loaded.policy(spec)
      results[spec] = dict(calibrated_on=s)
      outs, _, _ = decode(model, params, batches, policies[spec], steps)
      results[spec].update(summarize(cfg, batches, outs, source))
  times, cpus = {s: [] for s in policies}, {s: [] for s in policies}
  order = list(policies)
  for r in range(args.repeats):  # rounds, order rotated each round
    for s in order[r % len(order):] + order[:r % len(order)]:
      _, secs, cpu = decode(model, params, batches, policies[s], steps)
      times[s].append(secs)
      cpus[s].append(cpu)

  base = results[str(s_max)]
  base_t = statistics.median(times[str(s_max)])
  base_c = statistics.median(cpus[str(s_max)])
  rows = []
  for s in policies:
    res, med, cmed = results[s], statistics.median(times[s]), statistics.median(cpus[s])
    rows.append(dict(policy=s, **res, seconds=med, all_seconds=times[s], cpu_seconds=cmed,
                     all_cpu_seconds=cpus[s], cpu_ratio=cmed / base_c,
                     executed_flops_ratio=res["executed_flops_per_sample"]
                     / base["executed_flops_per_sample"],
                     flops_ratio=res["flops_per_sample"] / base["flops_per_sample"],
                     seconds_ratio=med / base_t))
  print(f"machine: {machine()}; load {load0} -> {load_average()}")
  print(f"model: {args.workdir} (step {config.source.get('step')}), S_max {s_max}, "
        f"{len(batches)} x {args.batch} held-out puzzles, {steps} steps, greedy confidence")
  print("\n| policy | cells | loops/call (per seq) | executed loops/call | FLOPs/sample (per seq)"
        " | executed FLOPs/sample | executed FLOPs vs S_max | wall s (median) | wall vs S_max"
        " | CPU s (median) | CPU vs S_max |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['policy']} | {r.get('cell_accuracy', float('nan')):.4f} | {r['loops_mean']:.2f}"
          f" | {r['executed_loops_mean']:.2f} | {r['flops_per_sample']:.3g} | "
          f"{r['executed_flops_per_sample']:.3g} | {r['executed_flops_ratio']:.3f} | "
          f"{r['seconds']:.3f} | {r['seconds_ratio']:.3f} | {r['cpu_seconds']:.3f} | "
          f"{r['cpu_ratio']:.3f} |")
  path = write_json("adaptive_loops.json", dict(machine=machine(), args=vars(args), steps=steps,
                                                 load=[load0, load_average()], rows=rows),
                    kernels=kernel_set(cfg.kernels))
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
