#!/usr/bin/env python3
"""Runs one `loopjax` command as N cooperating CPU processes on this machine (multi-host rehearsal).

    python launch/local_multiprocess.py --num-processes 2 --devices-per-process 4 -- \\
        loopjax train --config experiments/sudoku.py --workdir /tmp/run --config.mesh.data=-1

Each process i gets `--coordinator localhost:PORT --num-processes N --process-id i` appended and
XLA_FLAGS=--xla_force_host_platform_device_count=K, so jax.distributed joins them into one
runtime of N*K CPU devices (collectives over gloo). Processes may start in any order: each waits
for the others to connect (LOOPJAX_BARRIER_TIMEOUT). Output lines are prefixed with `[i]`.

If one process fails, the others are stopped (SIGTERM, then SIGKILL after --grace seconds); after
--timeout seconds all are. Each process runs in its own process group, which is what is stopped.
On failure a summary names what each process did (its exit code, or that it was stopped) with the
last lines of its output. The exit code is the first failure's (a signal N counts as 128 + N),
124 on a timeout, else 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

TAIL_LINES = 15


def _bindable(port: int) -> bool:
  with socket.socket() as s:
    try:
      s.bind(("localhost", port))
    except OSError:
      return False
  return True


def free_port() -> int:
  """A port free now, below the kernel's ephemeral range when it can be.

  Process 0 binds it only after importing JAX, seconds later; a port from the ephemeral range
  may meanwhile be handed to an outgoing connection (gloo opens many). A random one below the
  range is taken only by another launcher drawing the same number.
  """
  low = 32768
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
      low = int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    pass
  draw = random.SystemRandom()
  if low > 11000:
    for _ in range(50):
      port = draw.randrange(10000, low)
      if _bindable(port):
        return port
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Process:
  """One started process: its output pump, the tail of its output, and what became of it."""

  def __init__(self, i: int, argv: list[str], env: dict, cwd: str | None, out):
    self.i = i
    self.tail = collections.deque(maxlen=TAIL_LINES)
    self.fate = None  # why the launcher stopped it, if it did
    self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                  bufsize=1, start_new_session=True)
    self.pump = threading.Thread(target=self._pump, args=(out,), daemon=True)
    self.pump.start()
    self.ended = None  # time.monotonic() at its exit, to tell which of several failed first
    threading.Thread(target=self._wait, daemon=True).start()

  def _wait(self) -> None:
    self.popen.wait()
    self.ended = time.monotonic()

  def _pump(self, out) -> None:
    for line in iter(self.popen.stdout.readline, ""):
      self.tail.append(line.rstrip("\n"))
      out.write(f"[{self.i}] {line}")
      out.flush()

  def signal_group(self, sig) -> None:
    try:
      os.killpg(self.popen.pid, sig)  # its own group (start_new_session): it and its children
    except ProcessLookupError:
      pass

  def describe(self) -> str:
    code = self.popen.returncode
    if code is None:
      what = "still running"
    elif code < 0:
      what = f"killed by {signal.Signals(-code).name}"
    else:
      what = f"exited with code {code}"
    return what + (f" ({self.fate})" if self.fate else "")


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def _stop(procs: list[_Process], why: str, grace: float) -> None:
  """SIGTERM to every running process group, SIGKILL to those still running after `grace` s."""
  running = [p for p in procs if p.popen.poll() is None]
  for p in running:
    p.fate = why
    p.signal_group(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in running:
    try:
      p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.fate = f"{why}; killed after ignoring SIGTERM for {grace:g} s"
      p.signal_group(signal.SIGKILL)
      p.popen.wait()


def launch(command: list[str], num_processes: int, devices_per_process: int,
           port: int | None = None, env: dict | None = None, timeout: float | None = None,
           cwd: str | None = None, grace: float = 20.0, out=None) -> int:
  """Starts the processes, streams their output, waits; returns the exit code."""
  out = sys.stdout if out is None else out
  if command and command[0] == "loopjax":
    command = [sys.executable, "-m", "loopjax.cli", *command[1:]]
  port = port or free_port()
  base = dict(os.environ if env is None else env)
  flags = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  base["XLA_FLAGS"] = " ".join(
      flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  base["JAX_PLATFORMS"] = "cpu"
  start = time.monotonic()
  deadline = None if timeout is None else start + timeout
  procs: list[_Process] = []
  first_failure, code, summary = None, 0, None
  # SIGTERM to the launcher stops the processes too (as Ctrl-C does).
  old_term = signal.signal(signal.SIGTERM, signal.default_int_handler) \
      if threading.current_thread() is threading.main_thread() else None
  try:
    for i in range(num_processes):
      argv = command + ["--coordinator", f"localhost:{port}", "--num-processes",
                        str(num_processes), "--process-id", str(i)]
      procs.append(_Process(i, argv, base, cwd, out))
    # Every process is polled on every round (`any` would stop at the first one running).
    while [p.popen.poll() for p in procs].count(None):
      failed = [p for p in procs if p.popen.returncode not in (None, 0)]
      if failed:
        first_failure = min(failed, key=lambda p: p.ended or time.monotonic())
        code = _exit_code(first_failure.popen.returncode)
        summary = f"process {first_failure.i} failed after {time.monotonic() - start:.0f} s"
        _stop(procs, f"stopped after process {first_failure.i} failed", grace)
        break
      if deadline is not None and time.monotonic() > deadline:
        code, summary = 124, f"timed out after {timeout:g} s"
        _stop(procs, "stopped at the timeout", grace)
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    code, summary = 130, "interrupted"
    _stop(procs, "stopped: the launcher was interrupted", grace)
  finally:
    _stop(procs, "stopped by the launcher", grace)
    for p in procs:
      p.pump.join(timeout=5)
    if old_term is not None:
      signal.signal(signal.SIGTERM, old_term)
  if code == 0:
    failed = [p for p in procs if p.popen.returncode]
    if failed:
      first_failure = min(failed, key=lambda p: p.ended or time.monotonic())
      code = _exit_code(first_failure.popen.returncode)
      summary = f"process {first_failure.i} failed after {time.monotonic() - start:.0f} s"
  if code:
    lines = [f"local_multiprocess: {summary}; exit code {code}"]
    for p in procs:
      lines.append(f"  process {p.i}: {p.describe()}; its last lines:")
      lines.extend(f"    | {line}" for line in p.tail)
    out.write("\n".join(lines) + "\n")
    out.flush()
  return code


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--" not in argv:
    print(__doc__, file=sys.stderr)
    return 2
  cut = argv.index("--")
  p = argparse.ArgumentParser(prog="local_multiprocess.py")
  p.add_argument("--num-processes", type=int, default=2)
  p.add_argument("--devices-per-process", type=int, default=4)
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  p.add_argument("--timeout", type=float, default=None,
                 help="seconds before all processes are stopped (exit code 124)")
  p.add_argument("--grace", type=float, default=20.0,
                 help="seconds a stopped process gets between SIGTERM and SIGKILL")
  args = p.parse_args(argv[:cut])
  return launch(argv[cut + 1:], args.num_processes, args.devices_per_process, args.port,
                timeout=args.timeout, grace=args.grace)


if __name__ == "__main__":
  sys.exit(main())
