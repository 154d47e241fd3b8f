"""A stop request that reaches one process of a two-process job (launch/local_multiprocess.py)
makes both save the same step and exit 0; the resumed job then trains like an uninterrupted run.

Expensive (three short jobs), so the model is the smallest that trains and every wait has an
explicit, generous deadline; nothing depends on which process starts first."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
from run_logs import logged_losses, logged_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "sudoku.py")
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.py")
# Steps take milliseconds: the stop is agreed within a few steps of the signal, long before the
# end. One device per process, data=2 (the batch rows split between the processes).
STEPS = 200
TINY = ["--config.model.width=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.cond_dim=16", "--config.train.batch_size=4",
        "--config.loops.train=uniform:1:2", "--config.train.log_every=1",
        "--config.train.eval_every=100000", "--config.train.eval_batches=1",
        "--config.train.eval_time_points=2", "--config.train.async_checkpoints=False",
        "--config.train.checkpoint_every=100000", f"--config.train.steps={STEPS}",
        "--config.mesh.data=2"]
JOB_TIMEOUT = 600  # s, each job: a minute or two on a loaded 2-core machine
RTOL = 1e-5  # float32 sums in another order (2 processes vs 1 process of 2 devices)
# One process, two devices, no end-of-run task evaluation: the uninterrupted reference.
DRIVER = textwrap.dedent("""
  import sys
  from loopjax.config.load import load_config
  from loopjax.train.loop import train
  train(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])
""")


def _env(tmp, devices=None):
  env = dict(os.environ)
  flags = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _job(tmp, workdir):
  argv = [sys.executable, LAUNCH, "--num-processes", "2", "--devices-per-process", "1",
          "--timeout", str(JOB_TIMEOUT), "--", "loopjax", "train", "--config", EXPERIMENT,
          "--workdir", str(workdir), *TINY]
  return subprocess.Popen(argv, env=_env(tmp), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")


def _finish(proc, what):
  try:
    log, _ = proc.communicate(timeout=JOB_TIMEOUT + 60)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGTERM)  # the launcher stops its processes and reports
    log, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, f"{what}: exit code {proc.returncode}:\n{log[-8000:]}"
  return log


def _process(launcher_pid, index):
  """The pid of the launcher's child with --process-id INDEX, or None."""
  try:
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
  except OSError:
    return None
  for pid in children:
    try:
      argv = open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
      continue
    if "--process-id" in argv and argv[argv.index("--process-id") + 1] == str(index):
      return int(pid)
  return None


def test_sigterm_to_one_of_two_processes_saves_the_same_step_everywhere(tmp_path):
  work, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
  job = _job(tmp_path, work)
  try:
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline and job.poll() is None and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
      time.sleep(0.2)
    target = _process(job.pid, 1)
    assert job.poll() is None and target, "the job ended or never trained:\n" + (
        job.communicate(timeout=120)[0][-6000:] if job.poll() is not None else "")
    os.kill(target, signal.SIGTERM)  # process 1 only
    log = _finish(job, "the interrupted job")
  finally:
    if job.poll() is None:
      job.kill()
  saved = {int(i): int(s) for i, s in re.findall(r"^\[(\d)\] .*saved checkpoint (\d+), stopping",
                                                 log, re.M)}
  assert set(saved) == {0, 1} and saved[0] == saved[1], (
      f"each process should save the same step and stop: {saved}\n{log[-6000:]}")
  stop = saved[0]
  assert stop < STEPS and os.listdir(work / "checkpoints") == [str(stop)]

  resumed = _finish(_job(tmp_path, work), "the resumed job")
  assert f"resumed {work} at step {stop}" in resumed
  ref = tmp_path / "ref"
  proc = subprocess.run([sys.executable, "-c", DRIVER, EXPERIMENT, str(ref), *TINY],
                        env=_env(tmp_path, devices=2), cwd=ROOT, capture_output=True, text=True,
                        timeout=JOB_TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-6000:]
  assert [r["step"] for r in logged_rows(work)] == list(range(1, STEPS + 1))
  got, want = logged_losses(work), logged_losses(ref)
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [want[s] for s in range(1, STEPS + 1)], rtol=RTOL,
                             err_msg="the stopped and resumed job trains differently")
