"""Subprocesses for the multi-device and multi-process tests: their environment, 2-process jobs
through launch/local_multiprocess.py, one-process driver scripts, and failure reports.

Every started process has a deadline and writes its output to a file (a pipe nobody reads yet
could fill up). (Not named `multiprocess`: `datasets` imports the PyPI package of that name, which a
module here would shadow, tests/ being on sys.path.) A failure or an overrun fails the test with the exit code and the tail of the
output: a driver's own last lines; a job's log, which ends with the launcher's summary of each
process (its exit code or why it was stopped, and its last lines).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import FAST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "sudoku.py")
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.py")
# Deadlines (s). A 2-process job takes 1-5 min on a 2-core machine loaded 5x over and may take
# twice that loaded 10x over; a hang fails with every process's log, not a stall. The launcher
# stops a job's processes at JOB_TIMEOUT, well before their own barrier and shutdown timeouts
# (LOOPJAX_BARRIER_TIMEOUT), so what every process did is reported; the test stops the launcher
# BACKSTOP s after that if it has not ended by itself.
JOB_TIMEOUT, DRIVER_TIMEOUT, BACKSTOP = 600, 600, 60
BARRIER_TIMEOUT = 1800

# The smallest Sudoku model with every kind of stack (layer 0, then layer 1 looped S ~ U{1, 2}
# times), with a constant LR after a 2-step warm-up, so a run stopped at a step and resumed
# follows the same schedule as one that went straight on. Shared by the multi-device files so
# their one-device programs are compiled once per session.
TINY = ["--config.model.width=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.cond_dim=16", "--config.train.batch_size=8",
        "--config.loops.train=uniform:1:2", "--config.train.lr=2e-3",
        "--config.train.lr_schedule=constant",
        "--config.train.warmup_steps=2", "--config.train.log_every=1",
        "--config.train.eval_every=1000", "--config.train.eval_batches=1",
        "--config.train.eval_time_points=2", "--config.train.async_checkpoints=False"]

# One process trains CONFIG's run in WORKDIR with the overrides (argv: CONFIG WORKDIR OVERRIDE...),
# logging loopjax's INFO lines (resumes, compiles) as `loopjax train` does.
TRAIN = textwrap.dedent("""
  import logging, sys
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("loopjax").setLevel(logging.INFO)
  from loopjax.config.load import load_config
  from loopjax.train.loop import train
  train(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])
""")


def env(devices=None, **extra):
  """A subprocess's environment: CPU only, the fast compiler flags (so its compilation-cache
  entries match the session's), DEVICES fake CPU devices if given, the session's compilation
  cache (inherited), no machine-wide libtpu lock (a concurrent run holding it makes a TPU
  ahead-of-time compile fail; no TPU is driven here) and barrier timeouts past any deadline."""
  out = dict(os.environ)
  flags = [FAST_XLA_FLAGS]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  out.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             LOOPJAX_BARRIER_TIMEOUT=str(BARRIER_TIMEOUT), **extra)
  return out


def tail(text, lines=40):
  return "\n".join(text.splitlines()[-lines:])


class Started:
  """A started subprocess, its output file and its deadline."""

  def __init__(self, name, argv, log_dir, timeout, devices=None, extra_env=None, cwd=ROOT,
               job=False):
    self.name, self.job = name, job
    self.log_path = log_dir / f"{name}.log"
    self.log = open(self.log_path, "w+")
    self.start = time.monotonic()
    # A job's launcher stops its processes at its own --timeout; BACKSTOP is the test's.
    self.deadline = self.start + timeout + (BACKSTOP if job else 0)
    self.popen = subprocess.Popen(argv, env=env(devices, **(extra_env or {})), cwd=cwd,
                                  stdout=self.log, stderr=subprocess.STDOUT)
    self.pid = self.popen.pid

  def poll(self):
    return self.popen.poll()

  def wait(self, check=True):
    """(exit code, output) once it ends or overruns (then stopped). CHECK: fails the test with
    the exit code and the tail of the output unless the exit code is 0."""
    try:
      self.popen.wait(timeout=max(1.0, self.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      if self.job:  # the launcher stops its process groups, then reports
        self.popen.send_signal(signal.SIGTERM)
        try:
          self.popen.wait(timeout=BACKSTOP)
        except subprocess.TimeoutExpired:
          pass
      if self.popen.poll() is None:
        self.popen.kill()
        self.popen.wait()
    self.log.seek(0)
    out = self.log.read()
    if not self.log.closed:
      self.log.close()
      with open(self.log_path, "a") as f:
        f.write(f"\n(wall {time.monotonic() - self.start:.0f} s)\n")
    code = self.popen.returncode
    if check and code != 0:
      what = "overran its deadline (killed)" if code == -signal.SIGKILL else \
          f"exited with code {code}"
      last = out[-8000:] if self.job else tail(out)
      pytest.fail(f"{'2-process job' if self.job else 'driver'} {self.name!r} {what}; its "
                  f"last lines:\n{last}", pytrace=False)
    return code, out

  def output(self):
    """The output, once it ended with exit code 0 (else the test fails)."""
    return self.wait()[1]

  def result(self):
    """The parsed JSON of its last `RESULT ` line, once it ended with exit code 0."""
    out = self.output()
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if not lines:
      pytest.fail(f"driver {self.name!r} printed no RESULT line; its last lines:\n{tail(out)}",
                  pytrace=False)
    return json.loads(lines[-1][len("RESULT "):])

  def kill(self):
    if self.popen.poll() is None:
      self.popen.kill()
      self.popen.wait()
    if not self.log.closed:
      self.log.close()


def driver(name, log_dir, script, *args, devices=None, timeout=DRIVER_TIMEOUT, **kw):
  """Starts `python -c SCRIPT ARGS...` in one process of DEVICES CPU devices."""
  return Started(name, [sys.executable, "-c", script, *map(str, args)], log_dir, timeout,
                 devices=devices, **kw)


def train(name, log_dir, config, workdir, *overrides, devices=None, **kw):
  """Starts one process training CONFIG in WORKDIR (see TRAIN)."""
  return driver(name, log_dir, TRAIN, config, workdir, *overrides, devices=devices, **kw)


def job(name, log_dir, command, processes=2, devices=1, timeout=JOB_TIMEOUT, **kw):
  """Starts COMMAND (e.g. ["loopjax", "train", ...]) as PROCESSES cooperating processes of
  DEVICES CPU devices each, through launch/local_multiprocess.py stopping them at TIMEOUT."""
  argv = [sys.executable, LAUNCH, "--num-processes", str(processes), "--devices-per-process",
          str(devices), "--timeout", str(timeout), "--", *map(str, command)]
  return Started(name, argv, log_dir, timeout, job=True, **kw)


def process_pid(launcher_pid, index):
  """The pid of the launcher's child with --process-id INDEX, or None."""
  for pid in children(launcher_pid):
    try:
      with open(f"/proc/{pid}/cmdline") as f:
        argv = f.read().split("\0")
    except OSError:
      continue
    if "--process-id" in argv and argv[argv.index("--process-id") + 1] == str(index):
      return pid
  return None


def children(pid):
  """The pids of a process's children (a launcher's: its processes, each its own group)."""
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      return [int(c) for c in f.read().split()]
  except OSError:
    return []


def load_launcher():
  """launch/local_multiprocess.py as a module (its `launch` runs a job in this process)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("local_multiprocess", LAUNCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
