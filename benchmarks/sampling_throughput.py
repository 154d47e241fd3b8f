"""Sampling throughput: a jitted greedy confidence-decoding loop (`loopjax.diffusion.samplers.
confidence_sample` without cache, one fori_loop over denoising steps) from an all-[MASK] batch.

Prints generated tokens/s for each loop count S, and the forward-pass throughput implied
(denoising steps x analytic forward FLOPs, `loopjax.flops.inference_flops_per_sample`).

  python benchmarks/sampling_throughput.py [--loops 1,4,12 --steps 16 --batch 8 --length 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from perf_common import add_model_args  # noqa: E402


def build_sampler(cfg, params, steps):
  import jax

  from loopjax.diffusion.samplers import confidence_sample, from_logits_fn
  from loopjax.model import LoopedTransformer

  model = LoopedTransformer(cfg)

  @jax.jit
  def sample(params, x_BxL, loops):
    logits_fn = lambda x, t: model.apply({"params": params}, x, loops, t)
    return confidence_sample(from_logits_fn(logits_fn), jax.random.PRNGKey(0), x_BxL,
                             cfg.mask_id, steps, temperature=0.0, cache=False)["tokens"]

  return sample


def init_params(cfg, length):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from loopjax.model import LoopedTransformer
  x = jnp.zeros((1, length), jnp.int32)
  return nn.unbox(LoopedTransformer(cfg).init(jax.random.PRNGKey(0), x, 1)["params"])


def run(cfg, *, batch, length, steps, loops, repeats, peak=None):
  """Rows of {loops, seconds, tokens_per_sec, gflops_per_sec}; loops interleaved per round."""
  import jax
  import jax.numpy as jnp

  from loopjax import flops
  from perf_common import timed

  params = init_params(cfg, length)
  sample = build_sampler(cfg, params, steps)
  x = jnp.full((batch, length), cfg.mask_id, jnp.int32)
  for s in loops:  # compile once (S is traced), warm every S
    out = sample(params, x, jnp.int32(s))
    jax.block_until_ready(out)
  assert sample._cache_size() == 1, "sampler recompiled for a new S"
  times = {s: [] for s in loops}
  for _ in range(repeats):
    if peak is not None:
      peak.measure()
    for s in loops:
      out, wall, _ = timed(sample, params, x, jnp.int32(s))
      times[s].append(wall)
  assert int((out == cfg.mask_id).sum()) == 0, "masks left after decoding"
  rows = []
  for s in loops:
    med = statistics.median(times[s])
    f = batch * flops.inference_flops_per_sample(cfg, length, s, steps)
    rows.append(dict(loops=s, seconds=med, all=times[s], tokens_per_sec=batch * length / med,
                     gflops_per_sec=f / med / 1e9))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_args(p)
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--loops", default="1,4,12")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)

  from common import kernel_set, machine, write_json
  import jax
  from loopjax.model import ModelConfig, resolve_kernels
  from perf_common import load_average

  loops = [int(s) for s in args.loops.split(",")]
  cfg = ModelConfig(vocab_size=args.vocab, max_length=args.length, width=args.width,
                    num_layers=args.layers, num_heads=args.heads, loop_start=1, loop_end=3,
                    max_loops=max(loops))
  configured = cfg.kernels
  cfg = resolve_kernels(cfg, jax.devices())  # `auto`: what a run on these devices computes with
  load0 = load_average()
  rows = run(cfg, batch=args.batch, length=args.length, steps=args.steps, loops=loops,
             repeats=args.repeats)
  print(f"machine: {machine()}; load {load0} -> {load_average()}")
  print(f"config: width {args.width}, {args.layers} layers, block [1,3), L {args.length}, "
        f"B {args.batch}, {args.steps} denoising steps, confidence decoding, float32")
  print(f"{'S':>3} {'seconds':>8} {'tokens/s':>9} {'fwd GFLOP/s':>11}")
  for r in rows:
    print(f"{r['loops']:>3} {r['seconds']:>8.3f} {r['tokens_per_sec']:>9.1f} "
          f"{r['gflops_per_sec']:>11.1f}")
  path = write_json("sampling_throughput.json", dict(machine=machine(), args=vars(args), rows=rows),
                    kernels=kernel_set(configured))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
