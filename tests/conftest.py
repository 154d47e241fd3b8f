"""Shared pytest settings and fixtures: markers, a compilation cache for subprocesses, session
runs."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests compile afresh unless they ask for a cache (the fixtures below): `train.compile_cache=auto`
# reads this variable, and an empty value turns the persistent cache off, here and in every
# subprocess the tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "xla_behaviour: checks how XLA compiles or counts a program (cost analysis, "
      "loop lowering), not loopjax's own logic; may change with a jax/XLA upgrade without a "
      "loopjax bug (deselect with -m 'not xla_behaviour')")


@pytest.fixture(scope="session")
def tiny_sudoku_run(tmp_path_factory):
  """(workdir, what train returned, config) of a tiny Sudoku LoopMDM run of 3 steps, trained once
  per session for the tests that export or load a real run."""
  from loopjax.config.load import load_config
  from loopjax.train.loop import train
  c = load_config(os.path.join(ROOT, "experiments", "sudoku.py") + ":loopmdm")
  c.model.update(width=32, num_layers=3, num_heads=2, cond_dim=16)
  c.train.update(steps=3, batch_size=4, log_every=1, eval_batches=1, eval_time_points=2,
                 checkpoint_every=3, eval_every=1000, async_checkpoints=False)
  d = str(tmp_path_factory.mktemp("run") / "wd")
  return d, train(c, d), c


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
