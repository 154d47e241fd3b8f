"""Shared pytest settings and fixtures: fast compiler flags and one compilation cache for the
whole session (this process, xdist workers and every subprocess), markers, session runs."""

import os
import shutil
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite's programs are tiny and run a few steps, so compiling dominates: LLVM's expensive
# passes buy nothing here, and XLA:CPU's older loop emitters generate far less code to compile
# per fusion than its MLIR fusion emitters (the same math, run a few steps). Appended to (not
# replacing) a caller's XLA_FLAGS, e.g. a fake device count; read when the backend starts, which
# no test has done yet.
FAST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
if FAST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_XLA_FLAGS).strip()

# One persistent compilation cache for the session: a program compiled once (a shared tiny
# config, a model object rebuilt by a load, a subprocess repeating what another compiled) is read
# back, not compiled again. Entries are keyed by the program, the devices, the compiler flags
# and the jax version, so a hit is the executable that would have been compiled. A fresh folder
# per session keeps other sessions' entries out; the pytest process that made it (the xdist
# controller, whose environment the workers inherit) removes it at the end. Subprocesses inherit
# it through the environment (`train.compile_cache=auto` reads JAX_COMPILATION_CACHE_DIR); a test
# that times or counts compilation passes an empty value, which turns the cache off.
SESSION_CACHE_ENV = "LOOPJAX_TEST_COMPILE_CACHE"
_OWN_CACHE = SESSION_CACHE_ENV not in os.environ
if _OWN_CACHE:
  os.environ[SESSION_CACHE_ENV] = tempfile.mkdtemp(prefix="loopjax-test-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[SESSION_CACHE_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# Tests are CPU-only: no process of the session initialises an accelerator plugin by probing for
# one (libtpu then reads XLA_FLAGS only where a test compiles for a TPU topology, through
# loopjax.parallel.topology).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# libtpu (the TPU ahead-of-time compile checks) otherwise takes a machine-wide lock that a second
# worker or subprocess loading it would fail on; no TPU is driven here.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (after the environment above, in case a plugin imported it first)

jax.config.update("jax_compilation_cache_dir", os.environ[SESSION_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ[SESSION_CACHE_ENV], ignore_errors=True)


# The files that take longest, longest first: they start first, so the two xdist workers
# (`--dist loadfile`, files handed out in collection order) finish close together. Unlisted
# files follow in their usual order.
HEAVY_FILES = ("test_parallel.py", "test_study.py", "test_preemption.py", "test_train.py",
               "test_gcs.py", "test_prepare.py", "test_tpu_compile.py", "test_model.py",
               "test_gpu_check.py", "test_kernels.py", "test_lock.py", "test_writers.py",
               "test_samplers.py", "test_eval.py", "test_trainer.py", "test_loop_comm.py",
               "test_bf16.py", "test_hf_export.py", "test_api.py", "test_resolve.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "xla_behaviour: checks how XLA compiles or counts a program (cost analysis, "
      "loop lowering), not loopjax's own logic; may change with a jax/XLA upgrade without a "
      "loopjax bug (deselect with -m 'not xla_behaviour')")


@pytest.fixture(scope="session")
def tiny_sudoku_run(tmp_path_factory):
  """(workdir, what train returned, config) of the tiny Sudoku LoopMDM run (tests/tiny.py),
  trained once per session (per xdist worker) for the tests that load, sample, evaluate or export
  a real run. Read-only: a test that writes into a run uses `tiny_sudoku_copy`."""
  from loopjax.train.loop import train
  from tiny import tiny_config
  c = tiny_config()
  d = str(tmp_path_factory.mktemp("run") / "wd")
  return d, train(c, d), c


@pytest.fixture(scope="module")
def tiny_sudoku_copy(tiny_sudoku_run, tmp_path_factory):
  """A copy of the shared tiny run's folder for one test module to write into (eval outputs,
  edited configs), so the shared run stays as trained whatever order tests run in."""
  from pathlib import Path
  d = tmp_path_factory.mktemp("run_copy") / "wd"
  shutil.copytree(tiny_sudoku_run[0], d)
  return Path(d)
