"""Compile-only TPU devices of a named topology, for ahead-of-time compiles on any host.

`jax.experimental.topologies` with the `libtpu` wheel describes real TPU slices (device kinds,
coordinates, which host owns which chip) without a TPU attached, so the TPU compiler can lower,
lay out and size a program from a CPU machine. libtpu normally lets one process at a time load
it (a lock file); compile-only use touches no chip, so several processes may (ALLOW_MULTIPLE_LIBTPU_LOAD).
"""

from __future__ import annotations

import importlib.util
import os


def have_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_topology_devices(name: str, num_slices: int = 1) -> list:
  """Devices of a topology such as `v5p:2x4x4`, `v5e:2x4` or `v4:2x2x2` (needs libtpu)."""
  if not have_libtpu():
    raise ValueError(f"compiling for TPU topology {name!r} needs the libtpu wheel: "
                     "pip install -e '.[tpu]'")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # loads libtpu: only when a topology is asked for
  try:
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
  except Exception as e:
    raise ValueError(f"cannot build TPU topology {name!r}: {type(e).__name__}: "
                     f"{str(e).strip().splitlines()[-1][:300]} (is the `libtpu` wheel that "
                     "matches this jax installed? names look like v5e:2x4, v4:2x2x1)") from e
