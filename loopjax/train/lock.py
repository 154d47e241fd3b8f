"""One training run per workdir: `WORKDIR/lock.json` names the run that holds it.

The lock file is created with O_CREAT | O_EXCL, so of two runs that start together exactly one
gets it. Its holder refreshes the file's modification time every `HEARTBEAT_S` seconds. A lock
is stale, and is taken over with a warning, when its holder is gone: on the same host, when no
process with its pid and start time exists; on another host (a shared file system), when the
heartbeat is older than `STALE_AFTER_S`. Takeover renames the stale file away first (an atomic
step only one contender wins), then creates a fresh one.

In a multi-process job only process 0 takes the lock; the others follow its outcome.

On an object store (gs:// workdirs) the same steps run through `loopjax.storage`: the create is
an upload that GCS refuses when the object exists, the heartbeat re-uploads the file, and the
takeover deletes the stale object before creating a fresh one (no rename on object stores).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from loopjax import storage
from loopjax.errors import UserError

log = logging.getLogger("loopjax")

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirLockedError(UserError):
  """Another live run holds the workdir."""


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot), or None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      # Field 22; the command name (field 2) may contain spaces but ends with ')'.
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read(path: str) -> dict | None:
  try:
    holder = json.loads(storage.read_text(path))
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


def holder_alive(holder: dict, mtime: float, now: float | None = None) -> bool:
  """Whether the run described by `holder` (the lock's JSON) still runs."""
  now = time.time() if now is None else now
  if holder.get("host") == socket.gethostname():
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
      return False
    start = holder.get("process_start")
    return start is None or _process_start(pid) in (None, start)
  return now - mtime < STALE_AFTER_S


def describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"started {holder.get('started', '?')}")


class WorkdirLock:
  """Held for the life of a run; `release()` (or the context manager) removes the file."""

  def __init__(self, workdir: str):
    self.path = storage.join(storage.resolve(workdir), LOCK_FILE)
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> "WorkdirLock":
    pid = os.getpid()
    me = {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "token": self.token}
    for _ in range(3):
      if not storage.create_exclusive(self.path, json.dumps(me)):
        self._take_over_if_stale()
        continue
      self._thread = threading.Thread(target=self._beat, name="loopjax-lock", daemon=True)
      self._thread.start()
      return self
    raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep taking it")

  def _take_over_if_stale(self) -> None:
    try:
      mtime = storage.mtime(self.path)
    except FileNotFoundError:
      return
    holder = _read(self.path)
    if holder is None:
      # Being written right now by a run that just created it, or a torn file of a dead one.
      if time.time() - mtime < 10.0:
        time.sleep(1.0)
        return
      holder = {}
    elif holder_alive(holder, mtime):
      raise WorkdirLockedError(
          f"{storage.dirname(self.path)} is in use by another `loopjax train` ({describe(holder)}); "
          f"wait for it to finish, stop it, or use another --workdir (a lock left by a killed run "
          f"is taken over automatically; {self.path} names the holder)")
    try:
      if storage.is_remote(self.path):
        storage.remove(self.path)
      else:
        stale = f"{self.path}.stale-{self.token}"
        os.rename(self.path, stale)
        os.remove(stale)
    except FileNotFoundError:  # another contender took it over first
      return
    log.warning("took over the stale lock of a run that is gone (%s)", describe(holder) if holder
                else "unreadable lock file")

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        storage.touch(self.path)
      except FileNotFoundError:  # removed under us: nothing left to refresh
        return
      except OSError as e:  # a transient storage error; the next beat tries again
        log.warning("could not refresh the lock %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    holder = _read(self.path)
    if holder is not None and holder.get("token") == self.token:
      try:
        storage.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
