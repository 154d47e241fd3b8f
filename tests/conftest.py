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


@pytest.fixture
def in_process_compile_cache(compile_cache):
  """Turns JAX's persistent compilation cache on in the pytest process for one test.

  For a test that compiles the same programs many times through fresh model objects (each new
  object misses jax's in-memory caches; the persistent cache is keyed by the program itself).
  The previous settings are restored afterwards, so other tests compile as before.
  """
  import jax
  from jax._src import compilation_cache  # reset_cache: the documented way to re-read settings

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(compile_cache / "in_process"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in old.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
