"""The suite's one tiny Sudoku model and training setup, as `--config.*` overrides (for the CLI
or `load_config`) and as a loaded config. Tests that use it share compiled programs through the
session's compilation cache: a second training or load of the same shapes reads them back.

A LoopMDM of width 32 with 3 layers (layer 1 looped, S ~ U{1..3}), 2 heads, cond 16, batch 4;
a 3-step run checkpoints once, at its end, and evaluates nothing while it trains. ema_decay 0.5
averages over 2 steps, so a load at step 3 has no young-EMA warning. Variants change what a
test is about and nothing else (e.g. `tiny_config("mdm")`: the same layers without looping).
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUDOKU = os.path.join(ROOT, "experiments", "sudoku.py")

MODEL = ["--config.model.width=32", "--config.model.num_layers=3", "--config.model.num_heads=2",
         "--config.model.cond_dim=16", "--config.loops.train=uniform:1:3"]
TRAIN = ["--config.train.batch_size=4", "--config.train.steps=3", "--config.train.log_every=1",
         "--config.train.eval_every=1000", "--config.train.eval_batches=1",
         "--config.train.eval_time_points=2", "--config.train.checkpoint_every=3",
         "--config.train.async_checkpoints=False", "--config.train.ema_decay=0.5",
         "--config.eval.examples=2"]
TINY = MODEL + TRAIN
STEPS = 3


def tiny_config(variant: str = "loopmdm", *extra: str):
  """The loaded tiny Sudoku config of `variant` (experiments/sudoku.py), `extra` overrides
  last."""
  from loopjax.config.load import load_config
  return load_config(f"{SUDOKU}:{variant}", [*TINY, *extra])
