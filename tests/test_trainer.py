"""The trainer in process: step metrics stay on device between logged rows, rows are window means
with the loss per drawn S, and the trainer, the memory report and the benchmarks build their train
step through one function."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.array import ArrayImpl
from run_logs import logged_rows

from loopjax.parallel import mesh as mesh_lib
from loopjax.train import loop, memory
from loopjax.train import step as step_lib
from loopjax.train.metrics import keep_rows_through, window_add, window_means, window_zeros

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def _config(**train):
  spec = importlib.util.spec_from_file_location("sudoku_exp",
                                                os.path.join(ROOT, "experiments", "sudoku.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("loopmdm")
  c.model.update(width=32, num_layers=2, num_heads=2, cond_dim=16)
  c.loops.train = "uniform:1:3"
  c.train.update(steps=STEPS, batch_size=4, eval_batches=1, eval_time_points=2,
                 checkpoint_every=1000, eval_every=1000, async_checkpoints=False,
                 warmup_steps=0, lr_schedule="constant", **train)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


@pytest.fixture(scope="module")
def per_step(tmp_path_factory):
  """A run that logs every step: the per-step losses and drawn S."""
  workdir = str(tmp_path_factory.mktemp("per_step"))
  loop.train(_config(log_every=1), workdir)
  return logged_rows(workdir)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
  """The same run logging every 4 steps, with every device-to-host copy recorded by the number
  of train steps dispatched when it happened, and the train program the trainer built."""
  workdir = str(tmp_path_factory.mktemp("windowed"))
  mp = pytest.MonkeyPatch()
  checks, copies, programs = [], [], []
  check_batch, build = loop.check_batch, loop.build_train_step

  def counting_check(*args):  # runs once at set-up, then once before each step's dispatch
    checks.append(1)
    return check_batch(*args)

  value = ArrayImpl.__dict__["_value"]  # every np.asarray / float / device_get of an array

  def recording_value(self):
    copies.append(len(checks) - 1)
    return value.fget(self)

  mp.setattr(loop, "check_batch", counting_check)
  mp.setattr(loop, "build_train_step", lambda *a: programs.append(build(*a)) or programs[-1])
  mp.setattr(ArrayImpl, "_value", property(recording_value))
  try:
    out = loop.train(_config(log_every=4), workdir)
  finally:
    mp.undo()
  return out, logged_rows(workdir), copies, programs


def test_step_metrics_leave_the_device_only_after_a_logged_step(windowed):
  _, rows, copies, _ = windowed
  assert [r["step"] for r in rows] == [4, 8]
  # Steps 1-8 dispatch without waiting on the host. The row of step 4 is fetched once step 5 is
  # queued; step 8 (the last) is fetched, evaluated and saved before the run ends.
  during = sorted(set(c for c in copies if c > 0))
  assert during == [5, STEPS], (
      "device-to-host copies happened after these numbers of dispatched steps: "
      f"{during}; only the logged rows (after step 5 for the row of step 4, and the end) may "
      "copy: a per-step fetch blocks the host until the device finishes every step")


def test_rows_are_window_means_with_the_loss_per_drawn_s(per_step, windowed):
  _, rows, _, _ = windowed
  assert [r["step"] for r in per_step] == list(range(1, STEPS + 1))
  for row in rows:
    steps = [r for r in per_step if row["step"] - 4 < r["step"] <= row["step"]]
    for key in ("loss", "bits_per_token", "grad_norm", "masked_fraction", "scored_tokens"):
      np.testing.assert_allclose(row[key], np.mean([r[key] for r in steps]), rtol=1e-6,
                                 err_msg=key)
    drawn = sorted({int(r["loops"]) for r in steps})
    assert row["steps_by_loops"] == {str(s): sum(int(r["loops"]) == s for r in steps)
                                     for s in drawn}
    assert sorted(row["loss_by_loops"]) == [str(s) for s in drawn]
    for s in drawn:
      np.testing.assert_allclose(
          row["loss_by_loops"][str(s)],
          np.mean([r["loss"] for r in steps if int(r["loops"]) == s]), rtol=1e-6)
    np.testing.assert_allclose(row["loops"], np.mean([r["loops"] for r in steps]))
    assert row["lr"] == steps[-1]["lr"]
    assert row["tokens_per_sec"] > 0 and row["step_time"] > 0


def test_window_skips_nonfinite_steps_and_finds_the_first():
  losses = [2.0, np.nan, 4.0, np.inf, np.nan, 1.0]
  loops = [1, 2, 2, 3, 3, 2]
  w = window_zeros(3)
  for x, s in zip(losses, loops):
    ok = bool(np.isfinite(x))
    w = window_add(w, dict(loss=jnp.float32(x), bits_per_token=jnp.float32(x / np.log(2)),
                           grad_norm=jnp.float32(x + 1), masked_fraction=jnp.float32(0.5),
                           scored_tokens=jnp.float32(10.0), loops=jnp.int32(s),
                           finite=jnp.bool_(ok), lr=jnp.float32(0.1 * s)))
  host = jax.device_get(w)
  row = window_means(host)
  assert row["loss"] == pytest.approx(7.0 / 3) and row["grad_norm"] == pytest.approx(10.0 / 3)
  assert row["loops"] == pytest.approx(13 / 6) and row["nonfinite_steps"] == 3
  assert row["steps_by_loops"] == {"1": 1, "2": 3, "3": 2}
  assert row["loss_by_loops"]["1"] == 2.0 and row["loss_by_loops"]["2"] == pytest.approx(2.5)
  assert np.isnan(row["loss_by_loops"]["3"])  # S = 3 ran only a non-finite step
  assert row["lr"] == pytest.approx(0.2)
  assert int(host["first_bad"]) == 2 and np.isnan(host["first_bad_loss"])
  assert int(host["longest_bad_run"]) == 2 and int(host["bad_run"]) == 0  # steps 4-5 in a row


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
                  + '{"step": 5, "lo')  # cut short by a kill
  assert keep_rows_through(str(path), 2) == 3
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]


def test_trainer_memory_report_and_benchmarks_build_one_step(windowed, monkeypatch):
  out, _, _, (trainer_program,) = windowed
  built = []
  real = step_lib.build_train_step

  def spy(config, mesh):
    built.append(real(config, mesh))
    return built[-1]

  monkeypatch.setattr(memory, "build_train_step", spy)
  config = _config(log_every=4)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  compiled, program = memory.compile_train_step(config, mesh)
  abstract, batch = program.abstract_state, program.abstract_batch()
  assert len(built) == 1
  # The memory report compiled the trainer's step: the same state and batch shardings in, the
  # trainer's final state fits them, and the batch is the data's format.
  want = (trainer_program.state_shardings, {k: trainer_program.batch_sharding for k in batch})
  leaves = jax.tree_util.tree_leaves
  assert leaves(compiled.input_shardings[0]) == leaves(want)
  assert leaves(jax.tree_util.tree_map(lambda x: x.sharding, out["state"])) == \
      leaves(trainer_program.state_shardings)
  assert jax.tree_util.tree_structure(out["state"]) == jax.tree_util.tree_structure(abstract)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((4, 81), jnp.dtype(dt)) for k, dt in step_lib.BATCH_DTYPES.items()}
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import common
  finally:
    sys.path.remove(os.path.join(ROOT, "benchmarks"))
  monkeypatch.setattr(common, "build_train_step", spy)
  step, _, _, _ = common.build_step(common.lm_config(width=32, layers=2, heads=2, vocab=16,
                                                     length=8, batch=2))
  assert len(built) == 2 and step is built[-1].step_at_loops  # the variant that takes S
