"""Metric writers chosen by train.writers: a run writing metrics.jsonl, TensorBoard and an offline
W&B run, resumed into the same W&B run id; the checkpoints of evaluated steps carry their
held-out NELBO and `--step best` reads the lowest; bad writer names fail before any work; a stop
signal logs the partial window."""

import importlib.util
import json
import os

import numpy as np
import pytest
from run_logs import logged_rows, tensorboard_scalars, wandb_offline_runs
from test_trainer import _config as trainer_config

from loopjax.train import loop, writers


def _config(**train):
  """test_trainer's tiny sudoku run, evaluated and saved every 2 steps, to all three writers."""
  c = trainer_config()
  c.train.update(log_every=1, checkpoint_every=2, eval_every=2, keep_checkpoints=1,
                 keep_best=1, writers="jsonl,tensorboard,wandb", **train)
  return c


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """4 steps, then the same workdir resumed to 8, writing to all three writers (W&B offline)."""
  workdir = str(tmp_path_factory.mktemp("writers"))
  mp = pytest.MonkeyPatch()
  mp.setenv("WANDB_MODE", "offline")
  mp.setenv("WANDB_SILENT", "true")
  try:
    loop.train(_config(steps=4), workdir)
    loop.train(_config(steps=8), workdir)
  finally:
    mp.undo()
  return workdir


def test_all_three_writers_get_every_row_and_the_resume_attaches_to_the_same_wandb_run(
    resumed_run):
  rows = {r["step"]: r for r in logged_rows(resumed_run)}
  assert sorted(rows) == list(range(1, 9))
  tb = tensorboard_scalars(os.path.join(resumed_run, "tb"))
  assert tb["loss"] == pytest.approx({s: r["loss"] for s, r in rows.items()}, rel=1e-6)
  assert sorted(tb["eval_nats_per_token"]) == [2, 4, 6, 8]

  run_id = open(os.path.join(resumed_run, writers.WANDB_RUN_ID)).read().strip()
  runs = wandb_offline_runs(resumed_run)
  assert [r[0] for r in runs] == [run_id, run_id]  # the resumed session attaches to the same id
  steps = [sorted(h["_step"] for h in history if "loss" in h) for _, history in runs]
  assert steps == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the resume appends after the first session
  logged = {h["_step"]: h for _, history in runs for h in history if "loss" in h}
  for s, r in rows.items():
    assert logged[s]["loss"] == pytest.approx(r["loss"], rel=1e-6)
    for k, v in r["loss_by_loops"].items():  # per-S breakdowns as key/S curves
      assert logged[s][f"loss_by_loops/{k}"] == pytest.approx(v, rel=1e-6)
  assert logged[8]["eval_nats_per_token"] == pytest.approx(rows[8]["eval_nats_per_token"])


def test_evaluated_checkpoints_carry_their_nelbo_and_step_best_reads_the_lowest(resumed_run):
  import orbax.checkpoint as ocp
  from loopjax.io import checkpoints
  from loopjax.io.load import load_model_dir
  rows = {r["step"]: r for r in logged_rows(resumed_run)}
  manager = ocp.CheckpointManager(os.path.join(resumed_run, "checkpoints"))
  kept = sorted(manager.all_steps())
  saved = {s: manager.metrics(s)[checkpoints.BEST_METRIC] for s in kept}
  manager.close()
  for s, v in saved.items():
    assert v == pytest.approx(rows[s]["eval_nats_per_token"])
  # The newest (keep_checkpoints=1) and the lowest NELBO of all evaluated steps (keep_best=1).
  evaluated = {s: rows[s]["eval_nats_per_token"] for s in (2, 4, 6, 8)}
  lowest = min(evaluated, key=evaluated.get)
  assert kept == sorted({8, lowest})
  loaded = load_model_dir(resumed_run, step="best")
  assert loaded.config.source["step"] == lowest


def test_export_step_best_on_the_command_line(resumed_run, tmp_path, capsys):
  from loopjax import cli
  rows = {r["step"]: r["eval_nats_per_token"] for r in logged_rows(resumed_run)
          if "eval_nats_per_token" in r}
  lowest = min(rows, key=rows.get)  # of every evaluated step: the kept best
  assert cli.main(["export", "--workdir", resumed_run, "--out", str(tmp_path / "out"),
                   "--step", "best"]) == 0
  assert json.load(open(tmp_path / "out" / "config.json"))["weights"]["step"] == lowest
  with pytest.raises(SystemExit) as e:
    cli.main(["export", "--workdir", resumed_run, "--out", str(tmp_path / "x"), "--step", "last"])
  assert e.value.code == 2 and "--step 'last': want a checkpoint step" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_the_step_argument_is_an_integer_or_best():
  from loopjax.cli.args import parse_step
  assert parse_step("best") == "best" and parse_step("12") == 12 and parse_step(None) is None
  with pytest.raises(Exception, match="--step 'last'.*integer.*best"):
    parse_step("last")


def test_unknown_or_uninstalled_writers_are_refused_before_the_run_starts(monkeypatch, tmp_path):
  workdir = str(tmp_path / "run")
  c = _config(steps=4)
  c.train.writers = "jsonl,tensorbord"
  with pytest.raises(ValueError, match="no writer named 'tensorbord'; known: jsonl, tensorboard"):
    loop.train(c, workdir)
  c.train.writers = "jsonl,jsonl"
  with pytest.raises(ValueError, match="names a writer twice"):
    loop.train(c, workdir)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  c.train.writers = "jsonl,wandb"
  with pytest.raises(ValueError, match=r"wandb package is missing: pip install -e '\.\[wandb\]'"):
    loop.train(c, workdir)
  assert not os.path.exists(workdir), "the writers are checked before the workdir is written"


def test_a_registered_writer_gets_every_row(tmp_path):
  got = []

  class Recorder:
    def __init__(self, ctx):
      got.append(("open", ctx.start_step))

    def write(self, step, row):
      got.append((step, row["loss"]))

    def close(self):
      got.append("closed")

  writers.register("recorder", Recorder)
  try:
    opened = writers.open_writers("recorder", writers.WriterContext(str(tmp_path), 3))
    for w in opened:
      w.write(4, {"loss": np.float32(1.5)})
      w.close()
  finally:
    writers._FACTORIES.pop("recorder")
  assert got == [("open", 3), (4, 1.5), "closed"]
  assert not os.listdir(tmp_path)  # only the writers named are opened
  assert json.dumps(writers.scalars(writers.jsonable(
      {"step": 1, "a": np.float32(2.0), "b": {"3": 1.0}, "c": "ema", "d": float("nan")}))) == \
      '{"a": 2.0, "b/3": 1.0}'


def test_a_stop_signal_logs_the_partial_metrics_window(monkeypatch, tmp_path):
  # SIGINT during step 3 of a 10-step logging window: the run saves checkpoint 3 and its row
  # for steps 1-3 is logged (a window cut only at log steps would drop those steps' metrics).
  import signal
  workdir = str(tmp_path / "run")
  c = _config(steps=50)
  c.train.update(log_every=10, checkpoint_every=50, eval_every=50, writers="jsonl")
  reached = loop._StopRequests.reached

  def signal_at_step_3(self, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)
    return reached(self, step)

  monkeypatch.setattr(loop._StopRequests, "reached", signal_at_step_3)
  out = loop.train(c, workdir)
  assert out["metrics"]["stopped_by_signal"] and out["metrics"]["step"] == 3
  rows = logged_rows(workdir)
  assert [r["step"] for r in rows] == [3], rows
  assert np.isfinite(rows[0]["loss"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
