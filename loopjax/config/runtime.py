"""Process-wide runtime settings of a training run: the persistent compilation cache and the
profiler window.

The compilation cache (JAX's persistent cache) stores compiled executables keyed by the program,
the devices and the compiler flags, so a resumed, requeued or repeated run skips its compile.
`train.compile_cache`: "auto" uses $JAX_COMPILATION_CACHE_DIR if set (set but empty: off), else
~/.cache/loopjax/jax_cache; a path (local or gs://) uses that; "" turns it off.
"""

from __future__ import annotations

import logging
import os

import jax

from loopjax import storage

log = logging.getLogger("loopjax")

DEFAULT_CACHE = os.path.join("~", ".cache", "loopjax", "jax_cache")


def compile_cache_dir(setting: str) -> str | None:
  """The cache folder `train.compile_cache` names, or None when it is off."""
  if setting == "auto":
    setting = os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_CACHE)
  if not setting:
    return None
  return setting if "://" in setting else os.path.expanduser(setting)


def enable_compile_cache(setting: str) -> str | None:
  """Points JAX's persistent compilation cache at `compile_cache_dir(setting)` (idempotent)."""
  path = compile_cache_dir(setting)
  if path is None or jax.config.jax_compilation_cache_dir == path:
    return path
  if "://" not in path:
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  log.info("compilation cache: %s", path)
  return path


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """`train.profile_steps` "A:B" -> (A, B): trace steps A+1 .. B (after A steps have run)."""
  if not spec:
    return None
  try:
    a, b = (int(x) for x in str(spec).split(":"))
  except ValueError:
    raise ValueError(f"train.profile_steps must be 'A:B' with integers A < B, got {spec!r}") from None
  if not 0 <= a < b:
    raise ValueError(f"train.profile_steps must be 'A:B' with 0 <= A < B, got {spec!r}")
  return a, b


class Profiler:
  """A `jax.profiler` trace of the steps after step A through step B, written to
  WORKDIR/profile (one trace per process; open it with TensorBoard's profile plugin or Perfetto)."""

  def __init__(self, spec: str, workdir: str):
    self.window = parse_profile_steps(spec)
    self.path = storage.join(workdir, "profile")
    self.active = False

  def before_step(self, step: int) -> None:
    """Called with the number of steps already run."""
    if self.window and step == self.window[0] and not self.active:
      jax.profiler.start_trace(self.path)
      self.active = True
      log.info("profiling steps %d-%d into %s", step + 1, self.window[1], self.path)

  def after_step(self, step: int, state) -> None:
    if self.active and step >= self.window[1]:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      log.info("profile written to %s", self.path)
