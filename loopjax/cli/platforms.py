"""The platform choice, made before jax initialises its backends.

With libtpu installed (the `tpu` and `test` extras), jax's backend discovery loads libtpu's
plugin on every host; on a host without TPU chips libtpu then looks for the TPU metadata and
workers and prints error lines (`Failed to find host bounds`, `unexpected worker hostname`)
before jax falls back to the CPU. `choose` sets JAX_PLATFORMS=cpu when the host has no
accelerator device node, so no TPU plugin is initialised at all. An explicit JAX_PLATFORMS or
JAX_FORCE_TPU_INIT is left alone.

Accelerators are recognised by their device nodes, which their runtimes open: TPU chips are
/dev/accel<N> (v2 to v5e) or VFIO groups /dev/vfio/<N> (v5p and newer); NVIDIA GPUs /dev/nvidia<N>
(or /dev/nvidiactl in containers, /dev/dxg under WSL2); AMD GPUs /dev/kfd. This module imports
nothing outside the standard library.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

ACCELERATOR_NODES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*",
                     "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def has_accelerator(patterns=ACCELERATOR_NODES) -> bool:
  return any(glob.glob(p) for p in patterns)


def choose(environ=os.environ) -> str | None:
  """Sets JAX_PLATFORMS=cpu (and jax's setting, if jax is already imported) on a host with
  libtpu installed but no accelerator; returns the value set, or None when nothing changed."""
  if environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in environ:
    return None
  if importlib.util.find_spec("libtpu") is None or has_accelerator():
    return None
  environ["JAX_PLATFORMS"] = "cpu"
  jax = sys.modules.get("jax")
  if jax is not None and hasattr(jax, "config") and not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")
  return "cpu"
