"""A tiny Sudoku denoiser learns in a short run: held-out NELBO falls and cells beat chance.

The puzzles keep 60-70 of the 81 cells given, so most blanks are pinned down by the digits
already in their row, column and box. Digits are uniform at every cell, so a model that learns
nothing beyond digit frequencies scores log 9 nats per blank and fills cells right 1 time in 9;
beating both by the margins below needs attention that has found the board's structure. A sign
error in a residual, a dead attention output or a broken optimizer stays near those baselines.
"""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The public API this test uses (kept in one place).
from loopjax.config.load import load_config
from loopjax.data import make_eval_batches
from loopjax.diffusion import make_schedule
from loopjax.evaluate.likelihood import heldout_nelbo
from loopjax.evaluate.tasks import task_accuracy
from loopjax.loops import resolve_policy
from loopjax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "sudoku.py") + ":mdm"
STEPS = 300
OVERRIDES = [
    "--config.data.min_givens=60", "--config.data.max_givens=70",
    "--config.model.width=32", "--config.model.num_layers=2", "--config.model.num_heads=4",
    "--config.model.cond_dim=16", "--config.model.dtype=float32",
    f"--config.train.steps={STEPS}", "--config.train.batch_size=16", "--config.train.seed=0",
    "--config.train.lr=3e-3", "--config.train.lr_schedule=cosine",
    "--config.train.warmup_steps=20", "--config.train.eval_params=raw",
    f"--config.train.log_every={STEPS}", f"--config.train.eval_every={STEPS}",
    "--config.train.eval_batches=1", "--config.train.eval_time_points=2",
    f"--config.train.checkpoint_every={STEPS}", "--config.train.async_checkpoints=False",
]
UNIFORM_NATS = math.log(9)  # NELBO of a predictor that knows only the digits' frequencies
CHANCE = 1 / 9
# Requirements (nats per scored cell, cell accuracy). The initial loss lies above log 9 (random
# logits), so the fall from it must exceed what learning the uniform marginal alone gives.
MIN_FALL = 0.7
MIN_BELOW_UNIFORM = 0.25
MIN_OVER_CHANCE = 0.06


def test_short_run_learns_sudoku(tmp_path):
  config = load_config(EXPERIMENT, OVERRIDES)
  out = train(config, str(tmp_path))
  model = out["model"]
  trained = jax.device_get(out["state"].params)
  init = nn.unbox(jax.jit(model.init, static_argnums=2)(
      jax.random.PRNGKey(config.train.seed), jnp.zeros((1, 81), jnp.int32), 1)["params"])
  batches = make_eval_batches(config.data, batch_size=64, num_batches=1, seed=1)
  nelbo = lambda p: heldout_nelbo(model, p, batches, schedule=make_schedule(config.diffusion),
                                  loops=resolve_policy(model.cfg, 1),
                                  time_points=4)["nats_per_token"]
  before, after = nelbo(init), nelbo(trained)
  acc = task_accuracy(model, trained, batches, source="sudoku",
                      loops=resolve_policy(model.cfg, 1))
  seen = (f"held-out NELBO {before:.3f} -> {after:.3f} nats (log 9 = {UNIFORM_NATS:.3f}), "
          f"trainer's held-out {out['metrics']['eval_nats_per_token']:.3f}, cell accuracy "
          f"{acc['cell_accuracy']:.3f} (chance {CHANCE:.3f})")
  assert np.isfinite(out["metrics"]["loss"]) and acc["examples"] == 64, seen
  assert out["metrics"]["eval_nats_per_token"] < UNIFORM_NATS, seen
  assert after < before - MIN_FALL, f"the held-out NELBO must fall by > {MIN_FALL}: {seen}"
  assert after < UNIFORM_NATS - MIN_BELOW_UNIFORM, (
      f"the held-out NELBO must lie below log 9 by > {MIN_BELOW_UNIFORM} (else the model "
      f"learned no more than the digits' frequencies): {seen}")
  assert acc["cell_accuracy"] > CHANCE + MIN_OVER_CHANCE, (
      f"cell accuracy must beat chance by > {MIN_OVER_CHANCE}: {seen}")
