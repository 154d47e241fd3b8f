"""The workdir lock: one live run per workdir, stale locks of dead runs taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from train_process import train_cmd, train_env

from loopjax.train import lock as lock_lib


def _write_holder(workdir, **holder):
  path = os.path.join(workdir, lock_lib.LOCK_FILE)
  with open(path, "w") as f:
    json.dump(holder, f)
  return path


def test_second_acquire_names_the_holder_and_release_frees(tmp_path):
  with lock_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"pid {os.getpid()}") as e:
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert socket.gethostname() in str(e.value)
  assert not (tmp_path / lock_lib.LOCK_FILE).exists()
  lock_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  _write_holder(tmp_path, host=socket.gethostname(), pid=int(dead.stdout), started="earlier")
  with caplog.at_level("WARNING", logger="loopjax"):
    held = lock_lib.WorkdirLock(str(tmp_path)).acquire()
  assert "stale lock" in caplog.text and f"pid {int(dead.stdout)}" in caplog.text
  assert json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
  held.release()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
  # Our own pid, but another process start time: the recorded holder is gone.
  _write_holder(tmp_path, host=socket.gethostname(), pid=os.getpid(), process_start="1")
  lock_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_other_host_lock_is_stale_only_without_heartbeat(tmp_path):
  path = _write_holder(tmp_path, host="elsewhere.invalid", pid=1, started="now")
  with pytest.raises(lock_lib.WorkdirLockedError, match="elsewhere.invalid"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  old = time.time() - lock_lib.STALE_AFTER_S - 1
  os.utime(path, (old, old))
  lock_lib.WorkdirLock(str(tmp_path)).acquire().release()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cmd(workdir, steps):
  return train_cmd(workdir, "--config.train.checkpoint_every=2", f"--config.train.steps={steps}")


def _wait_for(predicate, timeout, what, proc):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, f"the first run exited early ({proc.returncode}) before {what}"
    assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
    time.sleep(0.5)


def test_second_trainer_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
  wd = tmp_path / "run"
  env = train_env()
  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen(_train_cmd(wd, 100000), stdout=log, stderr=subprocess.STDOUT,
                             env=env, cwd=ROOT)
  try:
    ckpts = wd / "checkpoints"
    _wait_for(lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()), 600,
              "its first checkpoint", first)
    config_stat = os.stat(wd / "config.json")
    start = time.monotonic()
    second = subprocess.run(_train_cmd(wd, 100000), capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    refused_after = time.monotonic() - start
    assert second.returncode != 0, second.stderr[-2000:]
    assert "is in use by another `loopjax train`" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    # Nothing of the first run was touched: its lock and config stand.
    assert json.loads((wd / lock_lib.LOCK_FILE).read_text())["pid"] == first.pid
    assert os.stat(wd / "config.json").st_mtime_ns == config_stat.st_mtime_ns
    print(f"second trainer refused after {refused_after:.1f} s")
  finally:
    first.kill()
    first.wait()
  saved = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  third = subprocess.run(_train_cmd(wd, saved + 1), capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
  assert third.returncode == 0, third.stderr[-3000:]
  assert "took over the stale lock" in third.stderr
  assert f"at step {saved}" in third.stderr  # resumed
  assert not (wd / lock_lib.LOCK_FILE).exists()  # released at the end


def test_a_refused_multi_process_job_stops_on_every_process(tmp_path):
  """Process 0 alone checks the lock; the others learn its answer instead of waiting at the
  first barrier for a peer that has already exited."""
  wd = tmp_path / "run"
  wd.mkdir()
  env = train_env()
  with lock_lib.WorkdirLock(str(wd)):  # a live holder: this test process
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"),
         "--num-processes", "2", "--devices-per-process", "1", "--timeout", "600", "--",
         "loopjax", *_train_cmd(wd, 10)[3:]], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=900)
    took = time.monotonic() - start
  out = r.stdout + r.stderr
  assert r.returncode not in (0, 124), out[-3000:]  # refused, not timed out
  for pid in (0, 1):  # both processes name the holder, neither prints a traceback
    lines = [l for l in out.splitlines() if l.startswith(f"[{pid}]")]
    assert any(f"pid {os.getpid()}" in l for l in lines), out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert not (wd / "config.json").exists()
  print(f"both processes refused after {took:.1f} s")
