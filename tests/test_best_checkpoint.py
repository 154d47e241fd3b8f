"""Best-by-metric checkpoints: the checkpoint with the lowest held-out NELBO is kept beside the
newest N (also across a restart of the writer), `step="best"` reads it, and a damaged best
falls back to the next lowest readable one with a warning."""

import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.io import checkpoints
from loopjax.io.checkpoints import Checkpointer

NELBO = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 5.0}  # step -> held-out NELBO saved with it


def _state(step):
  return {"params": {"w": jnp.full((3,), float(step))},
          "ema_params": {"w": jnp.full((3,), 100.0 + step)}}


def _save(directory, nelbo: dict, **kw):
  ckpt = Checkpointer(directory, keep=2, keep_best=1, async_save=False, **kw)
  data = iter(grain.MapDataset.range(8).to_iter_dataset())
  for step, value in nelbo.items():
    ckpt.save(step, _state(step), data,
              metrics=None if value is None else {checkpoints.BEST_METRIC: value})
  steps = ckpt.steps()
  ckpt.close()
  return steps


def _restore(directory, step):
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      _state(0)["ema_params"])
  tree, got = checkpoints.restore_params(directory, target, step=step)
  return np.asarray(tree["w"]), got


@pytest.fixture
def run(tmp_path):
  directory = str(tmp_path / "checkpoints")
  assert _save(directory, NELBO) == [2, 4, 5]  # the newest two and the lowest NELBO
  return directory


def test_step_best_reads_the_checkpoint_with_the_lowest_nelbo(run):
  w, step = _restore(run, "best")
  assert step == 2 and np.all(w == 102.0)  # its EMA weights
  assert _restore(run, None)[1] == 5  # no step: still the newest


def test_the_best_survives_a_restart_and_unevaluated_steps_are_kept_only_while_newest(run):
  # Reopened (a resumed run): the saved metrics rank the old steps; steps 6 and 7 were saved
  # without an evaluation, so they are not candidates for the best.
  assert _save(run, {6: None, 7: None}) == [2, 6, 7]
  assert _save(run, {8: 0.5}) == [7, 8]
  assert _restore(run, "best")[1] == 8


def test_a_damaged_best_falls_back_to_the_next_lowest_readable(run, caplog):
  damaged = 0
  for root, _, files in os.walk(os.path.join(run, "2", "state")):
    for name in files:
      if os.path.basename(root) == "d":  # the array data files, cut in half
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        damaged += 1
  assert damaged, "found no array data files to damage: has the Orbax layout changed?"
  with caplog.at_level(logging.WARNING, logger="loopjax"):
    w, step = _restore(run, "best")
  assert step == 4 and np.all(w == 104.0)  # NELBO 4.0 < 5.0 of the other readable one
  assert "checkpoint 2" in caplog.text and "unreadable" in caplog.text
  assert "using checkpoint 4 (the lowest held-out NELBO of the readable ones)" in caplog.text


def test_best_without_any_evaluated_checkpoint_is_a_one_line_error(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save(directory, {1: None, 2: None})
  with pytest.raises(checkpoints.UserError, match=r"--step best: no checkpoint in .* held-out "
                     r"NELBO .*train.eval_every.*the run has \[1, 2\]") as e:
    _restore(directory, "best")
  assert "\n" not in str(e.value)
