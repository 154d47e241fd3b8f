"""Shared pytest settings and fixtures: markers, a compilation cache for subprocesses."""

import pytest


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "xla_behaviour: checks how XLA compiles or counts a program (cost analysis, "
      "loop lowering), not loopjax's own logic; may change with a jax/XLA upgrade without a "
      "loopjax bug (deselect with -m 'not xla_behaviour')")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """A JAX persistent compilation cache directory for this session's subprocesses.

  Pass it as JAX_COMPILATION_CACHE_DIR to subprocesses that compile the same programs as one
  another. Entries are keyed by the program, the compile options and flags, and the jax
  version, so a hit is the executable the subprocess would have compiled; a fresh directory per
  session keeps other sessions' entries out. Not for tests that time or count compilations.
  """
  return tmp_path_factory.mktemp("jax_cache")
