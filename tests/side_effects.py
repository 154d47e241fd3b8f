"""What a command did, for tests that check it did nothing: the XLA compilations it ran, the
files it wrote."""

import os

import jax


def snapshot(path: str) -> dict:
  """{relative path: bytes (files) or None (folders)} of everything under `path`."""
  out = {}
  for d, dirs, files in os.walk(path):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), path)] = None
    for name in files:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), path)] = f.read()
  return out


class Compiles:
  """Counts XLA compilations while active (jax.monitoring's backend-compile events)."""

  def __enter__(self):
    self.events = []
    self._fn = lambda event, duration, **kw: self.events.append(event)
    jax.monitoring.register_event_duration_secs_listener(self._fn)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._fn)

  @property
  def count(self):
    return sum(e.endswith("backend_compile_duration") for e in self.events)
