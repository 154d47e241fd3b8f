"""The trainer end to end through the `loopjax train` command: exact resume after SIGKILL (one
metrics row per step), clean stop on SIGTERM (also before the first step), a bad start as a
process (exit 2, no traceback, existing checkpoints untouched), damaged checkpoints skipped by
every reader, non-finite losses, and early evaluation of raw weights beside a warming-up EMA.
What needs no process boundary (signals, exit status) runs `loopjax.cli.main` in this process."""

import hashlib
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from run_logs import logged_losses, logged_rows
from train_process import train_cmd, train_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *extra, timeout=300):
  return subprocess.run(train_cmd(workdir, *extra), capture_output=True, text=True,
                        timeout=timeout, env=train_env(), cwd=ROOT)


def _ckpt_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.05)
  return False


def _digest(path):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


STEPS = ["--config.train.steps=60", "--config.train.checkpoint_every=5"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run(workdir, *STEPS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_default_experiment_reports_accuracy(reference_run):
  workdir, proc = reference_run
  assert "held-out" in proc.stdout and "cell_accuracy" in proc.stdout
  for name in ("config.json", "metrics.jsonl", "tb", "checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name
  row = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())
  for key in ("step", "loss", "loops", "loss_by_loops", "steps_by_loops", "lr", "tokens_per_sec"):
    assert key in row
  acc = json.load(open(os.path.join(workdir, "eval", "final_task_accuracy.json")))
  assert 0.0 <= acc["cell_accuracy"] <= 1.0
  # The looped model is also scored at S = 1, 2, S_max, 2 S_max (S_max 3 here), with a plot.
  assert [r["loops"] for r in acc["by_loops"]] == [1, 2, 3, 6]
  assert acc["by_loops"][2]["cell_accuracy"] == acc["cell_accuracy"]
  assert "S=6 " in proc.stdout and "beyond training" in proc.stdout
  assert os.path.exists(os.path.join(workdir, "plots", "final_accuracy_vs_loops.png"))


def test_sigkill_then_resume_is_bitwise_identical(reference_run, tmp_path):
  ref_dir, _ = reference_run
  proc = subprocess.Popen(train_cmd(tmp_path, *STEPS), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=train_env(), cwd=ROOT)
  try:
    got_ckpt = _wait_for(lambda: any(s >= 10 for s in _ckpt_steps(tmp_path)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert got_ckpt, "the run ended before it wrote checkpoint 10"
  killed_at = max(_ckpt_steps(tmp_path))
  assert proc.returncode == -signal.SIGKILL and killed_at < 60
  resumed = _run(tmp_path, *STEPS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed {tmp_path} at step {killed_at}" in resumed.stderr
  steps = [row["step"] for row in logged_rows(tmp_path)]
  assert steps == sorted(set(steps)) == list(range(1, 61)), (
      "metrics.jsonl should hold one row per step after a resume (replayed rows replaced)")
  want, got = logged_losses(ref_dir), logged_losses(tmp_path)
  after = [s for s in want if s > killed_at]
  assert after and all(got[s] == want[s] for s in after), (
      "losses after the checkpoint differ from the uninterrupted run: the resumed run does not "
      f"see the same batches/randomness: {[(s, got[s], want[s]) for s in after[:5]]}")


def test_sigterm_saves_and_exits_zero(tmp_path):
  proc = subprocess.Popen(train_cmd(tmp_path, "--config.train.steps=100000",
                                    "--config.train.checkpoint_every=100000"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=train_env(),
                          cwd=ROOT, text=True)
  metrics = os.path.join(tmp_path, "metrics.jsonl")
  started = _wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 200, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert started, err[-2000:]
  assert proc.returncode == 0, err[-2000:]
  steps = _ckpt_steps(tmp_path)
  assert steps and steps[-1] == max(logged_losses(tmp_path)), (steps, err[-1000:])
  assert os.path.exists(os.path.join(tmp_path, "checkpoints", str(steps[-1]), "state"))


def test_a_bad_start_as_a_process_exits_2_and_leaves_the_checkpoints(tmp_path, reference_run):
  """A real `loopjax train` with a model that does not match the workdir's checkpoints: exit
  status 2, the error on stderr without a traceback, the checkpoints byte for byte as they were.
  The other classes of bad input run in process (test_bad_input.py's table)."""
  import shutil
  ref_dir, _ = reference_run
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  before = _digest(workdir / "checkpoints")
  proc = _run(workdir, *STEPS, "--config.model.width=64", timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "incompatible" in proc.stderr and "model.width" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert _digest(workdir / "checkpoints") == before, "a failed start changed the checkpoints"


def _damaged_copy(tmp_path, reference_run, damage=(-1,)):
  """A copy of the reference run whose checkpoints at positions `damage` (of the sorted steps)
  have their array data files emptied (a file cut in half may still hold every array a reader
  asks for: OCDBT packs many arrays per file, in an order the writer's threads decide); returns
  (workdir, steps)."""
  import shutil
  ref_dir, _ = reference_run
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  steps = _ckpt_steps(workdir)
  for i in damage:
    damaged = 0
    for root, _, files in os.walk(workdir / "checkpoints" / str(steps[i]) / "state"):
      for name in files:
        if "ocdbt" in root and os.sep + "d" in root:
          path = os.path.join(root, name)
          with open(path, "r+b") as f:
            f.truncate(0)
          damaged += 1
    assert damaged, "found no array data files to damage: has the Orbax layout changed?"
  return workdir, steps


def _cli(*argv):
  """`loopjax ARGV` in this process: (exit code, stderr)."""
  import contextlib
  import io
  from loopjax import cli
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    import logging
    handler = logging.StreamHandler(err)
    logger = logging.getLogger("loopjax")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # what the command logs as a process (resumes, skips)
    try:
      code = cli.main(list(argv))
    finally:
      logger.removeHandler(handler)
      logger.setLevel(level)
  return code, err.getvalue()


def test_export_and_sample_fall_back_past_a_damaged_newest_checkpoint(tmp_path, reference_run):
  workdir, steps = _damaged_copy(tmp_path, reference_run)
  code, err = _cli("export", "--workdir", str(workdir), "--out", str(tmp_path / "out"))
  assert code == 0, err[-3000:]
  assert f"checkpoint {steps[-1]}" in err and "unreadable" in err, err[-2000:]
  assert json.load(open(tmp_path / "out" / "config.json"))["weights"]["step"] == steps[-2]
  code, err = _cli("sample", "--workdir", str(workdir), "--num", "1", "--steps", "2")
  assert code == 0, err[-3000:]
  assert f"checkpoint {steps[-1]}" in err and f"using checkpoint {steps[-2]}" in err


def test_a_damaged_explicit_step_or_all_damaged_checkpoints_is_a_one_line_error(
    tmp_path, reference_run):
  workdir, steps = _damaged_copy(tmp_path, reference_run, damage=range(3))
  code, err = _cli("export", "--workdir", str(workdir), "--out", str(tmp_path / "a"),
                   "--step", str(steps[-1]))
  assert code == 2 and f"checkpoint {steps[-1]} in" in err and "unreadable" in err, err[-2000:]
  assert "Traceback" not in err and not os.path.exists(tmp_path / "a")
  code, err = _cli("export", "--workdir", str(workdir), "--out", str(tmp_path / "b"))
  assert code == 2 and "no readable checkpoint" in err and "Traceback" not in err, err[-2000:]


def _train_here(workdir, *extra):
  """`loopjax train` at the TINY size in this process: (exit code, stderr)."""
  return _cli(*train_cmd(workdir, *extra)[3:])


def test_damaged_latest_checkpoint_is_skipped(tmp_path, reference_run):
  workdir, steps = _damaged_copy(tmp_path, reference_run)
  code, err = _train_here(workdir, "--config.train.steps=65", "--config.train.checkpoint_every=5")
  assert code == 0, err[-3000:]
  assert f"checkpoint {steps[-1]}" in err and "unreadable" in err
  assert f"resumed {workdir} at step {steps[-2]}" in err


NONFINITE = ["--config.train.steps=30", "--config.train.checkpoint_every=2",
             "--config.train.lr=1e30", "--config.train.warmup_steps=0",
             "--config.train.clip_norm=0"]


def test_nonfinite_loss_stops_without_a_bad_checkpoint(tmp_path):
  code, err = _train_here(tmp_path, *NONFINITE)
  assert code != 0
  assert "non-finite" in err and "on_nonfinite=skip" in err
  import re
  bad_step = int(re.search(r"non-finite loss or gradient at step (\d+)", err).group(1))
  assert all(s < bad_step for s in _ckpt_steps(tmp_path)), "a checkpoint was written at or "\
      "after the non-finite step"


def test_skip_mode_stops_after_consecutive_skips_with_only_finite_checkpoints(tmp_path):
  from loopjax.io.load import load_run
  workdir = tmp_path / "skip"
  code, err = _train_here(workdir, *NONFINITE, "--config.train.on_nonfinite=skip",
                          "--config.train.max_consecutive_skips=4")
  assert code != 0, err[-2000:]
  assert "train.max_consecutive_skips=4" in err or "not finite" in err, err[-2000:]
  assert "Traceback" not in err, err[-3000:]
  assert max(_ckpt_steps(workdir), default=0) < 30
  for step in _ckpt_steps(workdir):
    for params in ("raw", "ema"):
      tree = load_run(str(workdir), step=step, params=params)[2]
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree)), (
          f"checkpoint {step} holds non-finite {params} weights")


def test_early_eval_reports_raw_beside_a_warming_up_ema(reference_run):
  workdir, proc = reference_run
  row = [r for r in logged_rows(workdir) if "eval_bits_per_token" in r][-1]
  assert row["step"] == 60 and row["eval_params"] == "ema"
  # After 60 steps an EMA of decay 0.99 is still 55% the initial weights (0.99^60).
  assert row["eval_raw_bits_per_token"] < row["eval_bits_per_token"], row
  assert "eval bits/tok raw" in proc.stderr and "ema warming up: step 60 < 1/(1-0.99) = 100" in \
      proc.stderr, proc.stderr[-2000:]


def test_sigterm_during_compile_exits_at_once_with_one_line(tmp_path):
  # The session's compilation cache off: a cached step would leave no compile to interrupt.
  proc = subprocess.Popen(train_cmd(tmp_path, "--config.train.steps=5"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(train_env(), JAX_COMPILATION_CACHE_DIR=""),
                          cwd=ROOT, text=True)
  lines = []
  try:
    for line in proc.stderr:
      lines.append(line)
      if "compiling the train and eval steps" in line:
        proc.send_signal(signal.SIGTERM)
        break
    rest = proc.communicate(timeout=120)[1]
  finally:
    if proc.poll() is None:
      proc.kill()
  err = "".join(lines) + rest
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "loopjax train: interrupted by SIGTERM before the first training step" in err, err
  assert "Traceback" not in err, err[-3000:]
  assert not _ckpt_steps(tmp_path) and not os.path.exists(tmp_path / "metrics.jsonl")
  assert not os.path.exists(tmp_path / "lock.json"), "the workdir lock was not released"
  json.load(open(tmp_path / "config.json"))  # whole
