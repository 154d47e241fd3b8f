"""The workdir lock: one live run per workdir, stale locks of dead runs taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

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
