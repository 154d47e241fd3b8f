"""Shared pytest settings: markers; session fixtures."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "xla_behaviour: checks how XLA compiles or counts a program (cost analysis, "
      "loop lowering), not loopjax's own logic; may change with a jax/XLA upgrade without a "
      "loopjax bug (deselect with -m 'not xla_behaviour')")


@pytest.fixture(scope="session")
def tiny_sudoku_run(tmp_path_factory):
  """(workdir, what train returned, config) of a tiny Sudoku LoopMDM run of 3 steps, trained once
  per session for the tests that export or load a real run."""
  from loopjax.train.config_load import load_config
  from loopjax.train.loop import train
  c = load_config(os.path.join(ROOT, "experiments", "sudoku.py") + ":loopmdm")
  c.model.update(width=32, num_layers=3, num_heads=2, cond_dim=16)
  c.train.update(steps=3, batch_size=4, log_every=1, eval_batches=1, eval_time_points=2,
                 checkpoint_every=3, eval_every=1000, async_checkpoints=False)
  d = str(tmp_path_factory.mktemp("run") / "wd")
  return d, train(c, d), c
