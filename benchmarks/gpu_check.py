"""Every GPU check in one command (< 5 minutes on one H100): bf16 MFU of the paper's
170M config, step time vs S, sampling tokens/s, and whether fused (cuDNN) attention works.

  python benchmarks/gpu_check.py            # on a GPU host
  python benchmarks/gpu_check.py --smoke    # tiny config, any backend (CPU: tests this script)

Checks, in order, printed as one table at the end (and written to results/gpu_check.json):
1. attention: `model.kernels="cudnn"` (jax.nn.dot_product_attention, cuDNN fused
   kernel, bf16 operands, rows of two documents so the mask is passed) compiles, runs and
   matches the reference kernels in logits and gradients; if not, the reason is printed and
   the rest runs with the reference kernels (labelled so in the table).
2. LoopMDM (12 layers, width 768, 12 heads, vocab 50258, length 1024, block [1,3),
   S ~ U{1..12}, bf16 compute, float32 params, AdamW + EMA): the largest batch of 32, 16, 8
   whose compiled step fits in device memory; step time at S = 1, 4, 12 (one compiled program)
   and MFU over steps with S drawn from U{1..12} (analytic FLOPs of the S each step ran / time /
   the device's bf16 peak from `loopjax.flops`).
3. the plain MDM (same model, no loop): MFU at the largest batch that fits.
4. sampling: confidence decoding, 32 steps, batch 8, S = 1, 4, 12: generated tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))

PAPER = dict(width=768, layers=12, heads=12, vocab=50258, length=1024)
SMOKE = dict(width=64, layers=4, heads=4, vocab=97, length=32)


def log(msg):
  print(msg, flush=True)


def check_attention(dims, dtype):
  """(kernels to use, note). Logits and gradients with kernels='cudnn' against 'reference'."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from loopjax.model import LoopedTransformer, ModelConfig
  base = dict(vocab_size=dims["vocab"], max_length=dims["length"], width=dims["width"],
              num_layers=2, num_heads=dims["heads"], dtype=dtype)
  length = min(dims["length"], 256)
  x = jax.random.randint(jax.random.PRNGKey(0), (2, length), 0, dims["vocab"])
  seg = jnp.concatenate([jnp.ones((2, length // 2), jnp.int32),
                         2 * jnp.ones((2, length - length // 2), jnp.int32)], axis=1)
  xla = LoopedTransformer(ModelConfig(**base, kernels="reference"))
  params = nn.unbox(xla.init(jax.random.PRNGKey(1), x, 1)["params"])
  # adaLN projections start at zero, which closes every attention branch's gate: open them, so
  # the logits depend on attention.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(7), a.shape)
      if "adaln" in jax.tree_util.keystr(p) else a, params)

  def logits_and_grad(model):
    logits = lambda p: model.apply({"params": p}, x, 1, None, seg)
    loss = lambda p: jnp.mean(jnp.sin(logits(p)))
    return jax.block_until_ready(jax.jit(lambda p: (logits(p), jax.grad(loss)(p)))(params))

  want, want_grad = logits_and_grad(xla)
  try:
    got, got_grad = logits_and_grad(LoopedTransformer(ModelConfig(**base, kernels="cudnn")))
  except Exception as e:  # noqa: BLE001 - any failure means: fall back, say why
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return "reference", (f"cuDNN attention unavailable ({type(e).__name__}: {reason}); "
                         "using the reference kernels")
  err = float(jnp.max(jnp.abs(got - want)))
  # Gradients leaf by leaf, relative to each leaf's largest reference entry.
  grad_err = max(float(jnp.max(jnp.abs(g - r)) / jnp.maximum(jnp.max(jnp.abs(r)), 1e-12))
                 for g, r in zip(jax.tree_util.tree_leaves(got_grad),
                                 jax.tree_util.tree_leaves(want_grad)))
  tol, grad_tol = 0.1, 0.1  # cuDNN attends in bfloat16 whatever the model's dtype
  if not (np.isfinite(err) and np.isfinite(grad_err)) or err > tol or grad_err > grad_tol:
    return "reference", (f"cuDNN attention differs from the reference (max |logit diff| "
                         f"{err:.3g}, tol {tol}; gradient {grad_err:.3g}, tol {grad_tol}); "
                         "using the reference kernels")
  return "cudnn", (f"cuDNN attention OK vs reference: max |logit diff| {err:.3g}, "
                   f"gradient {grad_err:.3g} (relative)")


def device_bytes():
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001
    stats = {}
  return stats.get("bytes_limit")


def fit_step(dims, batches, loop, loops_spec, dtype, attn, remat="none"):
  """Compiles the train step for the first batch that fits; returns a dict or None."""
  import jax
  import jax.numpy as jnp

  from common import build_step, lm_config
  limit = device_bytes()
  for b in batches:
    config = lm_config(width=dims["width"], layers=dims["layers"], heads=dims["heads"],
                       vocab=dims["vocab"], length=dims["length"], batch=b, loop=loop,
                       loops=loops_spec, dtype=dtype, remat=remat, kernels=attn)
    try:
      step, state, batch, cfg = build_step(config)
      t = time.perf_counter()
      compiled = step.lower(state, batch, jnp.int32(1)).compile()
      compile_s = time.perf_counter() - t
      ma = compiled.memory_analysis()
      need = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
              - ma.alias_size_in_bytes) if ma is not None else None
      if limit and need and need > 0.95 * limit:
        log(f"  batch {b}: needs {need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB, trying smaller")
        del state
        continue
      state, m = compiled(state, batch, jnp.int32(1))  # run once: a real OOM shows here
      jax.block_until_ready(m)
      return dict(step=compiled, state=state, batch=batch, cfg=cfg, batch_size=b,
                  compile_s=compile_s, need_gib=need / 2**30 if need else None)
    except Exception as e:  # noqa: BLE001
      msg = str(e)
      if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
        log(f"  batch {b}: out of memory, trying smaller")
        continue
      raise
  return None


def time_at(run, s, repeats):
  import jax
  import jax.numpy as jnp
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    run["state"], m = run["step"](run["state"], run["batch"], jnp.int32(s))
    jax.block_until_ready(m)
    ts.append(time.perf_counter() - t)
  return statistics.median(ts), float(m["loss"])


def mfu_over(run, loops_list, peak, length):
  """MFU over steps at the given S values (same compiled program)."""
  import jax
  import jax.numpy as jnp

  from loopjax import flops
  time_at(run, loops_list[0], 1)  # warm
  total_f, total_t = 0.0, 0.0
  for s in loops_list:
    t = time.perf_counter()
    run["state"], m = run["step"](run["state"], run["batch"], jnp.int32(s))
    jax.block_until_ready(m)
    total_t += time.perf_counter() - t
    total_f += flops.train_flops_per_step(run["cfg"], length, run["batch_size"], s)
  return dict(tflops=total_f / total_t / 1e12, mfu=total_f / total_t / peak if peak else None,
              step_s=total_t / len(loops_list),
              tokens_per_sec=run["batch_size"] * length * len(loops_list) / total_t)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny config; runs on CPU in ~1 minute")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--smax", type=int, default=12)
  p.add_argument("--batches", default="32,16,8")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--sample-steps", type=int, default=32)
  p.add_argument("--json", default="gpu_check.json")
  args = p.parse_args(argv)

  import jax
  import numpy as np

  from common import machine, write_json
  from loopjax import flops
  from loopjax.model import ModelConfig
  from sampling_throughput import run as run_sampling

  t_start = time.perf_counter()
  dims = SMOKE if args.smoke else PAPER
  smax = 4 if args.smoke else args.smax
  batches = [4, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
  sample_steps = 4 if args.smoke else args.sample_steps
  dev = jax.devices()[0]
  peak = flops.peak_flops_per_device(dev, dtype=args.dtype)
  log(f"machine: {machine()}; peak {args.dtype} FLOP/s: "
      f"{peak / 1e12 if peak else float('nan'):.4g} TFLOP/s"
      f"{' (CPU: measured float32 matmul)' if dev.platform == 'cpu' else ''}")
  table = []

  # 1. fused attention
  attn, note = check_attention(dims, args.dtype)
  log(f"[1] {note}")
  table.append(("attention", attn, note))

  # 2. LoopMDM
  log(f"[2] LoopMDM {dims}, block [1,3), S ~ U{{1..{smax}}}, {args.dtype}, attention {attn}")
  loop = fit_step(dims, batches, (1, 3), f"uniform:1:{smax}", args.dtype, attn)
  rows = {}
  if loop is None:
    table.append(("LoopMDM", "n/a", f"no batch of {batches} fits"))
  else:
    b = loop["batch_size"]
    log(f"  batch {b}; compile {loop['compile_s']:.1f}s; compiled memory "
        f"{loop['need_gib'] if loop['need_gib'] is not None else float('nan'):.1f} GiB")
    svals = sorted({1, min(4, smax), smax})
    for s in svals:
      rows[s] = time_at(loop, s, args.repeats)[0]
      log(f"  S={s}: step {rows[s] * 1e3:.1f} ms")
    draws = list(np.random.default_rng(0).integers(1, smax + 1, size=max(6, args.repeats * 2)))
    m = mfu_over(loop, [int(s) for s in draws], peak, dims["length"])
    f1 = flops.train_flops_per_step(loop["cfg"], dims["length"], b, 1)
    for s in svals:
      fr = flops.train_flops_per_step(loop["cfg"], dims["length"], b, s) / f1
      table.append((f"LoopMDM step S={s}", f"{rows[s] * 1e3:.1f} ms",
                    f"time ratio {rows[s] / rows[svals[0]]:.2f}, FLOP ratio {fr:.2f}"))
    table.append((f"LoopMDM S~U{{1..{smax}}} B={b}",
                  f"MFU {m['mfu']:.3f}" if m["mfu"] else "MFU n/a",
                  f"{m['tflops']:.1f} TFLOP/s, {m['tokens_per_sec']:.0f} tokens/s, "
                  f"{m['step_s'] * 1e3:.0f} ms/step"))
    del loop

  # 3. plain MDM
  log(f"[3] MDM (no loop) {dims}, {args.dtype}")
  mdm = fit_step(dims, batches, (0, 0), "fixed:1", args.dtype, attn)
  if mdm is None:
    table.append(("MDM", "n/a", f"no batch of {batches} fits"))
  else:
    m = mfu_over(mdm, [1] * max(5, args.repeats * 2), peak, dims["length"])
    table.append((f"MDM B={mdm['batch_size']}", f"MFU {m['mfu']:.3f}" if m["mfu"] else "MFU n/a",
                  f"{m['tflops']:.1f} TFLOP/s, {m['tokens_per_sec']:.0f} tokens/s, "
                  f"{m['step_s'] * 1e3:.0f} ms/step"))
    del mdm

  # 4. sampling
  log(f"[4] sampling: confidence decoding, {sample_steps} steps, batch 8")
  cfg = ModelConfig(vocab_size=dims["vocab"], max_length=dims["length"], width=dims["width"],
                    num_layers=dims["layers"], num_heads=dims["heads"], loop_start=1, loop_end=3,
                    max_loops=smax, dtype=args.dtype, kernels=attn)
  try:
    srows = run_sampling(cfg, batch=8 if not args.smoke else 2, length=dims["length"],
                         steps=sample_steps, loops=sorted({1, min(4, smax), smax}), repeats=2)
    for r in srows:
      table.append((f"sampling S={r['loops']}", f"{r['tokens_per_sec']:.0f} tokens/s",
                    f"{r['seconds']:.2f} s per batch, fwd {r['gflops_per_sec'] / 1e3:.2f} TFLOP/s"))
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    table.append(("sampling", "failed", f"{type(e).__name__}: {str(e)[:150]}"))

  total = time.perf_counter() - t_start
  log(f"\n{'check':<28} {'result':<16} detail")
  for name, res, detail in table:
    log(f"{name:<28} {res:<16} {detail}")
  log(f"total wall time {total:.0f}s (target < 300 s)")
  path = write_json(args.json if not args.smoke else "gpu_check_smoke.json",
                    dict(machine=machine(), smoke=args.smoke, dtype=args.dtype, dims=dims,
                         table=[dict(check=a, result=b, detail=c) for a, b, c in table],
                         seconds=total))
  log(f"wrote {path}")


if __name__ == "__main__":
  main()
