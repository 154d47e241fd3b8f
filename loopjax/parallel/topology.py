"""Compile-only TPU devices of a named topology, for ahead-of-time compiles on any host.

`jax.experimental.topologies` with the `libtpu` wheel describes real TPU slices (device kinds,
coordinates, which host owns which chip) without a TPU attached, so the TPU compiler can lower,
lay out and size a program from a CPU machine. libtpu normally lets one process at a time load
it (a lock file); compile-only use touches no chip, so several processes may (ALLOW_MULTIPLE_LIBTPU_LOAD).

libtpu reads its flags (LIBTPU_INIT_ARGS) once, when the process loads it, and the compiler
applies them to every later compile: `set_libtpu_flags` must run before the first topology is
built, and a process compiles with one generation's flags only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

from loopjax.parallel import xla_flags

_loaded_flags: str | None = None  # LIBTPU_INIT_ARGS as libtpu read them in this process


def have_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_topology_devices(name: str, num_slices: int = 1) -> list:
  """Devices of a topology such as `v5p:2x4x4`, `v5e:2x4` or `v4:2x2x2` (needs libtpu)."""
  if not have_libtpu():
    raise ValueError(f"compiling for TPU topology {name!r} needs the libtpu wheel: "
                     "pip install -e '.[tpu]'")
  global _loaded_flags
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  first = not _libtpu_initialized()  # this call loads libtpu and makes its first compile
  with _cpu_flags_hidden() if first else contextlib.nullcontext():
    from jax.experimental import topologies  # loads libtpu: only when a topology is asked for
    if first:
      _loaded_flags = os.environ.get("LIBTPU_INIT_ARGS", "")
    try:
      kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
      devices = list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
    except Exception as e:
      raise ValueError(f"cannot build TPU topology {name!r}: {type(e).__name__}: "
                       f"{str(e).strip().splitlines()[-1][:300]} (is the `libtpu` wheel that "
                       "matches this jax installed? names look like v5e:2x4, v4:2x2x1)") from e
    if first:  # libtpu reads XLA_FLAGS at its first compile: make that one now, in the window
      import jax  # pylint: disable=g-import-not-at-top
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      from jax.sharding import SingleDeviceSharding  # pylint: disable=g-import-not-at-top
      one = jax.ShapeDtypeStruct((), jnp.int32, sharding=SingleDeviceSharding(devices[0]))
      jax.jit(lambda x: x + 1).lower(one).compile()
  return devices


@contextlib.contextmanager
def _cpu_flags_hidden():
  """XLA_FLAGS without XLA:CPU's own flags (`--xla_cpu_*`) while libtpu loads and compiles
  first. libtpu parses XLA_FLAGS with its own copy of XLA's flag table, once, at its first
  compile, and aborts the process on a name it does not know, which includes XLA:CPU flags newer
  than its XLA; they never apply to a TPU compile. The CPU backend parses XLA_FLAGS once, at its
  own start, and keeps what it read."""
  flags = os.environ.get("XLA_FLAGS")
  if flags is None:
    yield
    return
  os.environ["XLA_FLAGS"] = " ".join(f for f in flags.split() if not f.startswith("--xla_cpu_"))
  try:
    yield
  finally:
    os.environ["XLA_FLAGS"] = flags


def _libtpu_initialized() -> bool:
  # Private jax: no public API says whether the TPU plugin is already loaded without starting
  # the backends (jax.extend.backend.backends() would initialise them, loading libtpu).
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  return xla_client.pjrt_plugin_loaded("tpu") and xla_client.pjrt_plugin_initialized("tpu")


def set_libtpu_flags(topology: str) -> tuple[str, str]:
  """Puts the flags the job runs with for `topology`'s generation into LIBTPU_INIT_ARGS before
  libtpu loads: the environment's LIBTPU_INIT_ARGS where set (as the launchers do), else the
  generation's set from `xla_flags`. Returns (flags, where they came from)."""
  if "LIBTPU_INIT_ARGS" in os.environ:
    wanted, source = os.environ["LIBTPU_INIT_ARGS"], "environment LIBTPU_INIT_ARGS"
  else:
    gen = xla_flags.generation(topology)
    wanted, source = xla_flags.flag_string(gen), f"loopjax.parallel.xla_flags[{gen!r}]"
  if have_libtpu() and _libtpu_initialized() and wanted != (_loaded_flags or ""):
    raise ValueError(f"libtpu is already loaded in this process with LIBTPU_INIT_ARGS="
                     f"{_loaded_flags!r}, not the {topology!r} flags {wanted!r}: compile for "
                     f"{topology!r} in a fresh process")
  os.environ["LIBTPU_INIT_ARGS"] = wanted
  return wanted, source


def libtpu_flags() -> str | None:
  """LIBTPU_INIT_ARGS that libtpu read in this process (None: not loaded by this module)."""
  return _loaded_flags
