"""Golden values of a fixed tiny training run: any change to the numbers the model computes shows.

Two optimizer steps of a fixed Sudoku config (width 32, 2 layers, layer 1 looped with S fixed
at 2, float32, batch 8, seed 0) through the public trainer. Two, not one: under the adaLN-zero
init every block's gates are zero, so the first step's loss and gradients do not depend on the
attention or MLP weights; the second step's loss and update do. float32 on CPU is deterministic,
so the tolerance only absorbs the float rounding of an equivalent computation (another kernel
choice, another reduction order), not a change of the math.
"""

import os

import jax
import numpy as np
import pytest
from run_logs import logged_losses

# The public API this test pins (kept in one place).
from loopjax.config.load import load_config
from loopjax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "sudoku.py") + ":mdm"
OVERRIDES = [
    "--config.model.width=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
    "--config.model.cond_dim=16", "--config.model.loop_start=1", "--config.model.loop_end=2",
    "--config.model.dtype=float32", "--config.loops.train=fixed:2", "--config.loops.eval=2",
    # Steps set explicitly, a constant learning rate and no warm-up: the first update is not
    # scaled to zero and nothing is derived from FLOP matching.
    "--config.train.steps=2", "--config.train.batch_size=8", "--config.train.seed=0",
    "--config.train.lr=3e-3", "--config.train.lr_schedule=constant",
    "--config.train.warmup_steps=0", "--config.train.log_every=1",
    "--config.train.eval_every=1000", "--config.train.eval_batches=1",
    "--config.train.eval_time_points=2", "--config.train.eval_params=raw",
    "--config.train.checkpoint_every=1000", "--config.train.async_checkpoints=False",
]

# Recorded from this run on CPU, float32.
GOLDEN = {
    "loss_step1": 2.6505606174468994,
    "loss_step2": 3.1780474185943604,
    "eval_nats_per_token": 2.509352684020996,
    "param_sum": 170.00687254067452,
    "param_sum_sq": 1086.8942460817989,
}
RTOL = 1e-5

WHEN_TO_UPDATE = """\
The golden values of the fixed two-step run changed.

Update GOLDEN in tests/test_golden.py ONLY if this change is meant to change the numbers the
model computes: its math (layers, attention, loss, masking, schedule), its initialisation
(including renamed or re-nested parameters, which changes their random draws), the Sudoku data
generation, or the optimizer recipe (learning-rate schedule, AdamW settings, clipping, EMA). Say
which in the commit message. Never update it to silence a difference you cannot explain: a
refactor, a kernel choice or a config-loading change must reproduce these values to rtol {rtol}.

got vs golden:
{table}

New values, to paste if the change is intended:
GOLDEN = {{
{new}
}}"""


def _run(workdir) -> dict:
  config = load_config(EXPERIMENT, OVERRIDES)
  out = train(config, str(workdir))
  losses = logged_losses(workdir)
  leaves = [np.asarray(x, np.float64) for x in
            jax.tree_util.tree_leaves(jax.device_get(out["state"].params))]
  return {
      "loss_step1": float(losses[1]),
      "loss_step2": float(losses[2]),
      "eval_nats_per_token": float(out["metrics"]["eval_nats_per_token"]),
      "param_sum": float(sum(x.sum() for x in leaves)),
      "param_sum_sq": float(sum((x * x).sum() for x in leaves)),
  }


def test_two_steps_match_golden_values(tmp_path):
  got = _run(tmp_path)
  bad = [k for k, want in GOLDEN.items()
         if not np.isclose(got[k], want, rtol=RTOL, atol=0.0)]
  if bad:
    table = "\n".join(f"  {k:22s} {got[k]!r:>22} vs {GOLDEN[k]!r:>22}"
                      f"{'   <-- differs' if k in bad else ''}" for k in GOLDEN)
    new = "\n".join(f"    {k!r}: {got[k]!r}," for k in GOLDEN)
    pytest.fail(WHEN_TO_UPDATE.format(rtol=RTOL, table=table, new=new), pytrace=False)
