#!/usr/bin/env python3
"""Runs one `loopjax` command as N cooperating CPU processes on this machine (multi-host rehearsal).

    python launch/local_multiprocess.py --num-processes 2 --devices-per-process 4 -- \\
        loopjax train --config experiments/sudoku.py --workdir /tmp/run --config.mesh.data=-1

Each process i gets `--coordinator localhost:PORT --num-processes N --process-id i` appended and
XLA_FLAGS=--xla_force_host_platform_device_count=K, so jax.distributed joins them into one
runtime of N*K CPU devices (collectives over gloo). Output lines are prefixed with `[i]`. If one
process fails the others are stopped; the exit code is the first non-zero one (else 0).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _pump(i: int, stream, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"[{i}] {line}")
    out.flush()


def launch(command: list[str], num_processes: int, devices_per_process: int,
           port: int | None = None, env: dict | None = None, timeout: float | None = None,
           cwd: str | None = None) -> int:
  """Starts the processes, streams their output, waits; returns the exit code."""
  if command and command[0] == "loopjax":
    command = [sys.executable, "-m", "loopjax.cli", *command[1:]]
  port = port or free_port()
  base = dict(os.environ if env is None else env)
  flags = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  base["XLA_FLAGS"] = " ".join(
      flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  base["JAX_PLATFORMS"] = "cpu"
  procs, pumps = [], []
  for i in range(num_processes):
    argv = command + ["--coordinator", f"localhost:{port}", "--num-processes",
                      str(num_processes), "--process-id", str(i)]
    p = subprocess.Popen(argv, env=base, cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True)
    t.start()
    pumps.append(t)
  deadline = None if timeout is None else time.monotonic() + timeout
  code = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed or (deadline is not None and time.monotonic() > deadline):
        code = failed[0] if failed else 124
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    code = 130
  finally:
    for p in procs:  # only the processes started here
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  if code == 0:
    code = next((p.returncode for p in procs if p.returncode), 0)
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
  p.add_argument("--timeout", type=float, default=None, help="seconds before stopping all")
  args = p.parse_args(argv[:cut])
  return launch(argv[cut + 1:], args.num_processes, args.devices_per_process, args.port,
                timeout=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
