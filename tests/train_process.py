"""The tiny `loopjax train` command line and environment of the tests that train in a process
of its own (test_train, test_lock): one model, batch and set of compiler flags, so every such
run compiles the same programs and the session's compilation cache serves all but the first."""

import os
import sys

from conftest import FAST_XLA_FLAGS
from tiny import MODEL, SUDOKU

# The suite's tiny model (tests/tiny.py) with a byte-sized vocabulary and these runs' own
# training keys.
TINY = MODEL + ["--config.model.vocab_size=257", "--config.train.batch_size=4",
                "--config.train.log_every=1", "--config.train.eval_every=1000",
                "--config.train.eval_batches=1", "--config.train.eval_time_points=2",
                "--config.eval.examples=4", "--config.train.async_checkpoints=False"]


def train_cmd(workdir, *extra):
  """`python -m loopjax.cli train` of the sudoku experiment at the TINY size."""
  return [sys.executable, "-m", "loopjax.cli", "train", "--config", SUDOKU,
          "--workdir", str(workdir), *TINY, *extra]


def train_env():
  """One CPU device and the session's compiler flags (those of the pytest process too)."""
  return dict(os.environ, XLA_FLAGS=FAST_XLA_FLAGS, JAX_PLATFORMS="cpu")
