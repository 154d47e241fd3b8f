"""Shared helpers for the benchmark scripts: build a config's train step and time it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.parallel import mesh as mesh_lib
from loopjax.config.base import base_config
from loopjax.train.step import build_train_step


def machine() -> str:
  d = jax.devices()[0]
  return (f"{d.device_kind} x{jax.device_count()} ({d.platform}), {os.cpu_count()} host cores, "
          f"{platform.python_version()}, jax {jax.__version__}")


def lm_config(*, width, layers, heads, vocab, length, batch, loop=(0, 0), loops="fixed:1",
              dtype="float32", remat="none", **model_kw):
  c = base_config()
  c.model.update(vocab_size=vocab, max_length=length, width=width, num_layers=layers,
                 num_heads=heads, loop_start=loop[0], loop_end=loop[1], dtype=dtype,
                 remat=remat, **model_kw)
  c.loops.train = loops
  # Steps run on random tokens; a text source of any length resolves without reading a file.
  c.data.source, c.data.seq_len = "text", length
  c.train.batch_size = batch
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def build_step(config):
  """(jitted step(state, batch, loops), state, batch, model config) on one device: the trainer's
  step (train/step.py:build_train_step) with S given per call."""
  program = build_train_step(config, mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1]))
  cfg = program.model.cfg
  b, length = program.batch_size, program.seq_len
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, length)), jnp.int32),
           "fixed": jnp.zeros((b, length), bool), "loss_mask": jnp.ones((b, length), bool),
           "segment_ids": jnp.ones((b, length), jnp.int32)}
  return program.step_at_loops, program.init_state(), batch, cfg


def time_step(step, state, batch, loops, *, repeats=5, warmup=1):
  """Median seconds of `repeats` steps at S = loops (state threaded through; donated)."""
  s = jnp.int32(loops)
  for _ in range(warmup):
    state, m = step(state, batch, s)
  jax.block_until_ready(m)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = step(state, batch, s)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times, state


def git_commit() -> str:
  """HEAD of the checkout the benchmark runs from, `-dirty` when a tracked Python file differs
  from it (docs and results files do not change a measurement); "unknown" outside git."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            ":/*.py"], cwd=here, check=True, capture_output=True,
                           text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("-dirty" if dirty else "")


def kernel_set(configured: str, devices=None) -> dict:
  """The `model.kernels` a result was measured with: as configured, and the set it resolves to
  on `devices` (default: the first local device, which the CPU benchmarks compile for)."""
  from loopjax.model.kernels import resolve
  return {"configured": configured,
          "resolved": resolve(configured, jax.devices()[:1] if devices is None else devices)}


def write_json(name: str, payload: dict, *, kernels: dict | str) -> str:
  """Writes benchmarks/results/`name`: `payload` with the commit, the UTC time and the kernel
  set (`kernel_set`, or a sentence where no model kernel runs) in front."""
  os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
  path = os.path.join(os.path.dirname(__file__), "results", name)
  now = datetime.datetime.now(datetime.timezone.utc)
  head = {"commit": git_commit(), "measured_utc": now.isoformat(timespec="seconds"),
          "kernels": kernels}
  with open(path, "w") as f:
    json.dump({**head, **payload}, f, indent=2)
  return path
