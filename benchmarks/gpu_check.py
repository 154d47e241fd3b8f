"""The GPU checks a 10-minute lease can finish: the paper's LoopMDM step as trained, cuDNN
attention checked through the looped model, MFU and sampling, with the JSON written after
every phase and a hard stop before the deadline.

  python benchmarks/gpu_check.py --deadline-s 540     # on a GPU host (a 10-minute lease)
  python benchmarks/gpu_check.py --smoke --attention xla_cpu   # tiny config, CPU: tests this script

Phases, in order; results/gpu_check.json is rewritten after each (and at the start), so a lease
that ends mid-run leaves every finished phase. A phase is skipped (and says so) when less time
is left than it needs; a watchdog writes the JSON and ends the process (exit 3) `--margin-s`
before `--deadline-s`, even inside a compile.

1. attention: the paper's LoopMDM (experiments/owt.py:loopmdm: 12 x 768, block [1,3),
   vocabulary padded to a multiple of 128, bf16, remat as configured) at L = 1024 with S = 3,
   so the loop (scan + cond) runs, and with the `--attention` kernels (default cudnn) against
   the reference kernels: logits and gradients, for rows of one document (no segment ids: no
   mask is passed) and rows of two documents (the mask, as cuDNN's bias). The tolerance comes
   from bf16 itself: both runs are compared with the reference in float32, and the fused kernel
   must be no further from it than 2x the bf16 reference's own distance (+1e-3). Both round
   every matmul operand to bf16 (unit roundoff 2^-8) and differ only in summation order and
   where the rounding happens, so a correct kernel lands at the same distance; a wrong mask or
   layout is off by O(1). On failure the rest runs with the reference kernels (labelled).
2. loopmdm: the trainer's own step (train/step.py) of experiments/owt.py:loopmdm on one device,
   S drawn inside the step from loops.train (U{1..12}) as in training, rows of one document
   (segment ids None, as MDLM's wrapped rows are); the largest batch of `--batches` whose
   compiled step fits; MFU from the S each step drew (the step's `loops` metric).
3. mdm: the same for experiments/owt.py:mdm at the largest batch that fits.
4. sampling: confidence decoding, batch 8, S = 1, 4, 12: generated tokens/s.

Not yet run on a GPU: no GPU has been available to this project. The CPU `--smoke` path
(tests/test_gpu_check.py) exercises every phase's code on a tiny config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = ["--config.model.width=32", "--config.model.num_layers=3", "--config.model.num_heads=2",
         "--config.model.cond_dim=16", "--config.model.vocab_size=97",
         "--config.model.max_length=32", "--config.data.seq_len=32"]
# Seconds a phase is given at least (compiles included) before it is skipped: rough allowances,
# not measurements (the script has not run on a GPU); the smoke run scales them by 0.1.
NEEDS = {"attention": 90, "loopmdm": 120, "mdm": 90, "sampling": 45}


class Report:
  """The JSON of the run, rewritten whole (to a temporary file, then renamed) after each phase."""

  def __init__(self, path, payload):
    self.path, self.data, self.lock = path, payload, threading.Lock()
    self.write()

  def phase(self, name, result):
    with self.lock:
      self.data["phases"][name] = result
    self.write()

  def write(self):
    with self.lock:
      self.data["seconds"] = round(time.perf_counter() - T0, 1)
      tmp = f"{self.path}.tmp"
      with open(tmp, "w") as f:
        json.dump(self.data, f, indent=2)
      os.replace(tmp, self.path)


T0 = time.perf_counter()


def log(msg):
  print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def paper_config(variant, overrides):
  from loopjax.config.load import load_config
  return load_config(os.path.join(ROOT, "experiments", f"owt.py:{variant}"), overrides)


def _rel(a, b):
  """||a - b|| / ||b|| over all leaves of two trees, in float64."""
  import jax
  import numpy as np
  num = den = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    num += float(np.sum((x - y) ** 2))
    den += float(np.sum(y ** 2))
  return (num / max(den, 1e-300)) ** 0.5


def check_attention(config, kernels, loops=3, batch=2):
  """Through the looped model: `kernels` and the bf16 reference, each against the float32
  reference, for one-document rows (no mask) and two-document rows (mask)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from loopjax.model import LoopedTransformer, resolve_kernels
  from loopjax.config import from_config

  cfg = from_config(config).model
  length = int(config.data.seq_len)
  models = {"candidate": LoopedTransformer(resolve_kernels(
                dataclasses.replace(cfg, kernels=kernels), jax.devices())),
            "reference": LoopedTransformer(dataclasses.replace(cfg, kernels="reference")),
            "float32": LoopedTransformer(dataclasses.replace(cfg, kernels="reference",
                                                             dtype="float32"))}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
  target = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
  params = nn.unbox(models["reference"].init(jax.random.PRNGKey(1), x, 1)["params"])
  # adaLN gates and the output head start at zero (logits would not depend on attention):
  # every all-zero leaf gets small random values.
  params = jax.tree_util.tree_map(
      lambda a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape, a.dtype)
      if not np.any(np.asarray(a)) else a, params)
  vocab = cfg.vocab_size
  two_docs = jnp.asarray(np.repeat([[1] * (length // 2) + [2] * (length - length // 2)],
                                   batch, 0), jnp.int32)

  def run(model, seg):
    def loss(p, s):
      logits = model.apply({"params": p}, x, s, None, seg)
      lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
      # The vocabulary's own columns (padding columns and [MASK] hold a constant -1e9-like
      # value that would swamp the comparison).
      return -jnp.mean(jnp.take_along_axis(lp, target[..., None], -1)), logits[..., :vocab]
    # S as a Python int: the loop's scan of S_max iterations with its i < S condition, as in
    # training (a traced S at inference adds a while loop past S_max, which has no gradient).
    fn = jax.jit(lambda p: jax.value_and_grad(loss, has_aux=True)(p, loops))
    (_, logits), grads = fn(params)
    return jax.block_until_ready((logits, grads))

  out = {"loops": loops, "length": length, "batch": batch, "kernels": kernels}
  ok = True
  for name, seg in (("one_document_no_mask", None), ("two_documents_mask", two_docs)):
    truth = run(models["float32"], seg)
    ref = run(models["reference"], seg)
    got = run(models["candidate"], seg)
    r = {}
    for i, what in enumerate(("logits", "grads")):
      r[f"{what}_bf16_reference_vs_f32"] = _rel(ref[i], truth[i])
      r[f"{what}_candidate_vs_f32"] = _rel(got[i], truth[i])
      r[f"{what}_tolerance"] = 2 * r[f"{what}_bf16_reference_vs_f32"] + 1e-3
      good = np.isfinite(r[f"{what}_candidate_vs_f32"]) and (
          r[f"{what}_candidate_vs_f32"] <= r[f"{what}_tolerance"])
      r[f"{what}_ok"] = bool(good)
      ok &= bool(good)
    out[name] = r
    log(f"  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float)))
  out["ok"] = ok
  return out


def _batch(b, length, vocab):
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  # One document per row (MDLM's wrapped rows): no segment ids, so no mask reaches attention.
  return {"tokens": jnp.asarray(rng.integers(0, vocab, (b, length)), jnp.int32),
          "fixed": jnp.zeros((b, length), bool), "loss_mask": jnp.ones((b, length), bool),
          "segment_ids": None}


def fit_and_time(variant, overrides, batches, steps, deadline):
  """The trainer's step at the first batch that fits; `steps` steps with S drawn in the step."""
  import jax
  import numpy as np

  from loopjax import flops
  from loopjax.parallel import mesh as mesh_lib
  from loopjax.train.step import build_train_step

  stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
  limit = (stats or {}).get("bytes_limit")
  for b in batches:
    config = paper_config(variant, overrides + [f"--config.train.batch_size={b}",
                                                "--config.mesh.data=1", "--config.mesh.fsdp=1",
                                                "--config.mesh.tensor=1"])
    program = build_train_step(config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
    cfg, length = program.model.cfg, program.seq_len
    batch = _batch(b, length, cfg.vocab_size)
    t = time.perf_counter()
    try:
      state = program.init_state()
      compiled = program.step.lower(state, batch).compile()
      compile_s = time.perf_counter() - t
      ma = compiled.memory_analysis()
      need = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
              - ma.alias_size_in_bytes) if ma is not None else None
      if limit and need and need > 0.95 * limit:
        log(f"  batch {b}: needs {need / 2**30:.1f} of {limit / 2**30:.1f} GiB, trying smaller")
        continue
      state, m = compiled(state, batch)  # the first step: a real OOM shows here
      jax.block_until_ready(m)
    except Exception as e:  # noqa: BLE001
      if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
        log(f"  batch {b}: out of memory, trying smaller")
        continue
      raise
    times, loops, losses = [], [], []
    for _ in range(steps):
      if time.perf_counter() > deadline:
        break
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
      loops.append(int(m["loops"]))
      losses.append(float(m["loss"]))
    peak = flops.peak_flops_per_device(jax.devices()[0], dtype=cfg.dtype)
    total_f = sum(flops.train_flops_per_step(cfg, length, b, s) for s in loops)
    total_t = sum(times)
    return {"batch_size": b, "seq_len": length, "padded_vocab": cfg.padded_vocab,
            "remat": cfg.remat, "loop_remat": cfg.loop_remat, "dtype": cfg.dtype, "kernels": cfg.kernels, "loops_train": config.loops.train,
            "compile_s": compile_s, "need_gib": need / 2**30 if need else None,
            "steps": len(times), "loops_drawn": loops, "losses": losses,
            "step_s_median": float(np.median(times)) if times else None,
            "tflops": total_f / total_t / 1e12 if total_t else None,
            "mfu": total_f / total_t / peak if total_t and peak else None,
            "tokens_per_sec": b * length * len(times) / total_t if total_t else None}
  return {"skipped": f"no batch of {batches} fits"}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny config; runs on CPU")
  p.add_argument("--attention", default="cudnn", help="kernel set checked against the reference")
  p.add_argument("--batches", default="32,16,8")
  p.add_argument("--steps", type=int, default=12, help="timed train steps per model")
  p.add_argument("--sample-steps", type=int, default=32)
  p.add_argument("--deadline-s", type=float, default=540,
                 help="seconds after start by which the script has stopped")
  p.add_argument("--margin-s", type=float, default=10,
                 help="the watchdog ends the process this long before the deadline")
  p.add_argument("--phases", default=",".join(NEEDS),
                 help=f"comma-separated subset of {','.join(NEEDS)}")
  p.add_argument("--json", default=None, help="default results/gpu_check[_smoke].json")
  args = p.parse_args(argv)
  phases = [x for x in args.phases.split(",") if x]
  if set(phases) - set(NEEDS):
    p.error(f"--phases {args.phases!r}: unknown {sorted(set(phases) - set(NEEDS))}; "
            f"choose from {','.join(NEEDS)}")
  deadline = T0 + args.deadline_s - args.margin_s
  path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                   "gpu_check_smoke.json" if args.smoke else "gpu_check.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  from common import git_commit
  report = Report(path, {"commit": git_commit(), "smoke": args.smoke,
                         "deadline_s": args.deadline_s, "phases": {}, "status": "running"})

  def stop():  # the watchdog: even a compile that would run past the deadline ends here
    report.data["status"] = f"stopped by the watchdog at {time.perf_counter() - T0:.0f}s"
    report.write()
    print(f"gpu_check: {report.data['status']}; wrote {path}", flush=True)
    os._exit(3)

  watchdog = threading.Timer(max(deadline - time.perf_counter(), 0), stop)
  watchdog.daemon = True
  watchdog.start()

  from common import machine
  from sampling_throughput import run as run_sampling
  report.data["machine"] = machine()
  report.write()
  overrides = SMOKE if args.smoke else []
  batches = [4, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
  scale = 0.1 if args.smoke else 1.0
  log(f"machine: {report.data['machine']}; deadline in {deadline - time.perf_counter():.0f}s")

  def time_left(name):
    if name not in phases:
      return False
    left = deadline - time.perf_counter()
    if left < NEEDS[name] * scale:
      report.phase(name, {"skipped": f"{left:.0f}s left before the deadline, needs "
                                     f"{NEEDS[name] * scale:.0f}s"})
      log(f"[{name}] skipped: deadline")
      return False
    return True

  attn = args.attention
  if time_left("attention"):
    log(f"[attention] {attn} vs reference through the looped model")
    try:
      r = check_attention(paper_config("loopmdm", overrides), attn)
    except Exception as e:  # noqa: BLE001 - any failure means: fall back, say why
      traceback.print_exc()
      r = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    if not r["ok"]:
      log(f"  {attn} not usable; the rest runs with the reference kernels")
      attn = "reference"
    r["used_for_the_rest"] = attn
    report.phase("attention", r)
  else:
    attn = "reference"
  kernels = [f"--config.model.kernels={attn}"]

  loop_cfg = None
  for name in ("loopmdm", "mdm"):
    if not time_left(name):
      continue
    log(f"[{name}] experiments/owt.py:{name}, kernels {attn}")
    try:
      r = fit_and_time(name, overrides + kernels, batches, args.steps, deadline)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      r = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    log(f"  {json.dumps({k: v for k, v in r.items() if k not in ('losses', 'loops_drawn')})}")
    report.phase(name, r)

  if time_left("sampling"):
    from loopjax.config import from_config
    loop_cfg = from_config(paper_config("loopmdm", overrides + kernels)).model
    smax = loop_cfg.max_loops
    log(f"[sampling] confidence decoding, {args.sample_steps} steps, batch 8")
    try:
      rows = run_sampling(loop_cfg, batch=2 if args.smoke else 8,
                          length=loop_cfg.max_length, steps=4 if args.smoke else args.sample_steps,
                          loops=sorted({1, min(4, smax), smax}), repeats=2)
      r = {"rows": rows}
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      r = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    report.phase("sampling", r)

  watchdog.cancel()
  report.data["status"] = "done"
  report.write()
  log(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
