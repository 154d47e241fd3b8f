"""bfloat16 compute: the residual stream and the loop carries are bfloat16 (norm statistics,
softmax, loss and optimizer stay float32), and a short run's losses track float32's.

50 optimizer steps of a tiny LoopMDM (Sudoku config, width 32, layer 1 of 3 looped, S ~ U{1..3})
on the same batches and seed, once with model.dtype=float32 and once with bfloat16. The
difference comes from rounding only: each loss stays within TOL (relative) of float32's,
while training moves the loss by far more than that.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.parallel import mesh as mesh_lib
from loopjax.config.load import load_config
from loopjax.train.step import build_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 50
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per op). On this run the
# largest per-step difference is 1.5% of the loss (mean 0.2%) while the loss falls 2.56 -> 1.67;
# 4% leaves room for another CPU's rounding, and is far below what training moves.
TOL = 0.04


def _program(dtype):
  overrides = ["--config.model.width=32", "--config.model.num_layers=3",
               "--config.model.num_heads=2", "--config.model.cond_dim=16",
               "--config.model.loop_start=1", "--config.model.loop_end=2",
               f"--config.model.dtype={dtype}", "--config.model.dropout=0.0",
               "--config.loops.train=uniform:1:3", "--config.train.batch_size=8",
               "--config.train.lr=3e-3", "--config.train.lr_schedule=constant",
               "--config.train.warmup_steps=0", "--config.train.seed=0"]
  config = load_config(os.path.join(ROOT, "experiments", "sudoku.py"), overrides)
  return build_train_step(config, mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]))


def _batches():
  # Learnable rows: each row counts up from its own offset (mod 9).
  r = np.random.default_rng(0)
  for _ in range(STEPS):
    start = r.integers(0, 9, size=(8, 1))
    tokens = ((start + np.arange(81)[None, :]) % 9).astype(np.int32)
    yield {"tokens": tokens, "fixed": np.zeros_like(tokens, bool),
           "loss_mask": np.ones_like(tokens, bool), "segment_ids": np.ones_like(tokens)}


def _losses(dtype):
  program = _program(dtype)
  state, losses = program.init_state(), []
  for batch in _batches():
    state, metrics = program.step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.asarray(losses), program


def test_bf16_stream_and_carries_are_bf16():
  program = _program("bfloat16")
  model = program.model
  tokens = jnp.zeros((2, 81), jnp.int32)
  params = program.init_state().params
  _, aux = model.apply({"params": params}, tokens, 2, collect=True)
  assert aux["loop_hiddens_SxBxLxD"].dtype == jnp.bfloat16
  # Parameters (and so the optimizer) stay float32; the logits are float32.
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  assert model.apply({"params": params}, tokens, 2).dtype == jnp.float32
  f32 = _program("float32").model
  _, aux = f32.apply({"params": params}, tokens, 2, collect=True)
  assert aux["loop_hiddens_SxBxLxD"].dtype == jnp.float32


def test_bf16_losses_track_float32_over_50_steps():
  f32, _ = _losses("float32")
  bf16, _ = _losses("bfloat16")
  assert np.all(np.isfinite(bf16))
  rel = np.abs(bf16 - f32) / f32
  assert rel.max() < TOL, (rel.max(), f32, bf16)
  # The run learns: the loss falls by many times the tolerance.
  assert f32[-5:].mean() < (1 - 5 * TOL) * f32[:5].mean(), f32
