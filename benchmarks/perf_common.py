"""Helpers shared by the CPU throughput benchmarks: host set-up, an interleaved matmul peak, load.

On a shared CPU host the achievable FLOP/s moves by 2x from one minute to the next, so every
figure these scripts print is a ratio of measurements taken side by side in one process:
variants are interleaved round by round and a burst of the reference float32 matmul (the peak of
`loopjax.flops.measure_cpu_matmul_peak`) runs before every round. Medians, never single runs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

# XLA:CPU allocates each step's temporaries (~1.3 GB at the reference config) afresh. glibc
# serves blocks over 32 MiB with a fresh mmap and unmaps them on free, so every step page-faults
# its temp buffer back in (4 KiB pages: ~460k minor faults, ~1 s of kernel time per step), and
# worse when programs of different sizes alternate in one process. The tunables below give
# malloc transparent huge pages, take big blocks from the heap (no mmap), keep freed heap memory
# (no trim) and use one arena (a thread's own arena could not hold such blocks): ~0 faults and
# ~0 kernel time per step; the process keeps its peak heap. They must be set before the process
# starts: the benchmarks re-exec themselves once (`--glibc-defaults` to compare).
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1")


def ensure_malloc_tuning(argv=None) -> bool:
  """Re-executes this script with GLIBC_TUNABLES=MALLOC_TUNABLES unless they are set or
  `--glibc-defaults` is in argv. Returns whether the tuning is active."""
  argv = sys.argv if argv is None else argv
  active = MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")
  if active or "--glibc-defaults" in argv:
    return active
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES) if x)
  os.execve(sys.executable, [sys.executable] + argv, env)
  return True  # not reached


def add_model_args(p, *, width=256, layers=12, heads=4, vocab=512, length=128, batch=8):
  """The model-size flags every benchmark takes (defaults: the loop benchmarks' config)."""
  p.add_argument("--width", type=int, default=width)
  p.add_argument("--layers", type=int, default=layers)
  p.add_argument("--heads", type=int, default=heads)
  p.add_argument("--vocab", type=int, default=vocab)
  p.add_argument("--length", type=int, default=length)
  p.add_argument("--batch", type=int, default=batch)


def load_average() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


class MatmulPeak:
  """The reference float32 n x n matmul, measured in bursts between the timed runs."""

  def __init__(self, n: int = 1024, burst: int = 8, dtype="float32"):
    import jax
    import jax.numpy as jnp
    self.n, self.burst = n, burst
    dt = jnp.dtype(dtype)
    kw = {"preferred_element_type": jnp.float32} if dt != jnp.float32 else {}
    self._dot = jax.jit(lambda a, b: jnp.dot(a, b, **kw))
    self._a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dt)
    self._b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dt)
    self._dot(self._a, self._b).block_until_ready()
    self.wall, self.cpu = [], []  # FLOP/s per burst (median of the burst), FLOP per CPU-second

  def measure(self) -> float:
    ts, c0 = [], time.process_time()
    for _ in range(self.burst):
      t = time.perf_counter()
      self._dot(self._a, self._b).block_until_ready()
      ts.append(time.perf_counter() - t)
    flop = 2.0 * self.n ** 3
    self.cpu.append(self.burst * flop / max(time.process_time() - c0, 1e-9))
    self.wall.append(flop / statistics.median(ts))
    return self.wall[-1]

  @property
  def median(self) -> float:
    return statistics.median(self.wall)

  @property
  def median_cpu(self) -> float:
    return statistics.median(self.cpu)


def timed(fn, *args):
  """(result, wall seconds, process CPU seconds) of fn(*args), blocking on the result."""
  import jax
  t, c = time.perf_counter(), time.process_time()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t, time.process_time() - c
