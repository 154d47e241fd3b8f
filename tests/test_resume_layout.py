"""A checkpoint resumes with another number of processes: the train state reshards onto the new
mesh and each process's data position is re-derived from the step, so the continuation trains
on the same examples as the saved layout's own continuation.

The two-process job runs through launch/local_multiprocess.py (one CPU device per process, gloo
collectives). It resumes as one process of two devices (the same mesh, data=2: the same
arithmetic, so bitwise-equal losses) and as one process of one device (mesh data=1)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from run_logs import logged_losses, logged_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "sudoku.py")
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.py")
STEPS, HALF = 8, 4
TINY = ["--config.model.width=16", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.cond_dim=8", "--config.train.batch_size=4",
        "--config.loops.train=uniform:1:2", "--config.train.log_every=1",
        "--config.train.eval_every=100000", "--config.train.eval_batches=0",
        "--config.train.eval_time_points=2", "--config.train.async_checkpoints=False",
        f"--config.train.checkpoint_every={HALF}", "--config.train.keep_checkpoints=5",
        f"--config.train.steps={STEPS}", "--config.mesh.data=-1"]
JOB_TIMEOUT = 300  # s: a tiny model, but a loaded 2-core machine
# One device sums the batch's per-example losses and gradients in another order than two
# devices (a local sum per device, then an all-reduce of the two): float32 rounding only.
RTOL_ONE_DEVICE = 1e-6
DRIVER = textwrap.dedent("""
  import logging, sys
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("loopjax").setLevel(logging.INFO)
  from loopjax.config.load import load_config
  from loopjax.train.loop import train
  train(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])
""")


def _env(tmp, devices=1):
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true "
                       f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _two_processes(tmp, workdir):
  argv = [sys.executable, LAUNCH, "--num-processes", "2", "--devices-per-process", "1",
          "--timeout", str(JOB_TIMEOUT), "--", "loopjax", "train", "--config", EXPERIMENT,
          "--workdir", str(workdir), *TINY]
  proc = subprocess.run(argv, env=_env(tmp), cwd=ROOT, capture_output=True, text=True,
                        errors="replace", timeout=JOB_TIMEOUT + 120)
  assert proc.returncode == 0, f"two-process job: exit {proc.returncode}\n{proc.stdout[-6000:]}"
  return proc.stdout


def _one_process(tmp, workdir, *extra, devices=1):
  return subprocess.run([sys.executable, "-c", DRIVER, EXPERIMENT, str(workdir), *TINY, *extra],
                        env=_env(tmp, devices), cwd=ROOT, capture_output=True, text=True,
                        errors="replace", timeout=JOB_TIMEOUT)


def _copy_at(src, dst, step):
  """The run folder as it was right after checkpoint `step` (later checkpoints removed)."""
  shutil.copytree(src, dst)
  for name in os.listdir(dst / "checkpoints"):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(dst / "checkpoints" / name)


def test_one_process_resumes_a_two_process_checkpoint(tmp_path):
  two = tmp_path / "two"
  _two_processes(tmp_path, two)
  layout = json.loads((two / "checkpoints" / str(HALF) / "layout" / "metadata").read_text())
  assert layout["process_count"] == 2 and layout["row_shards"] == [[[0, 2]], [[1, 2]]]

  want = logged_losses(two)
  for devices in (2, 1):
    one = tmp_path / f"one_process_{devices}_devices"
    _copy_at(two, one, HALF)
    proc = _one_process(tmp_path, one, devices=devices)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"resumed {one} at step {HALF}" in proc.stderr
    assert "data position re-derived" in proc.stderr
    assert [r["step"] for r in logged_rows(one)] == list(range(1, STEPS + 1))
    got = logged_losses(one)
    got, ref = ([d[s] for s in range(HALF + 1, STEPS + 1)] for d in (got, want))
    if devices == 2:
      assert got == ref, f"the one-process continuation trains differently: {got} vs {ref}"
    else:
      np.testing.assert_allclose(got, ref, rtol=RTOL_ONE_DEVICE,
                                 err_msg="the one-device continuation trains differently")

  # Another global batch size cannot continue the same stream: refused before any compile.
  bad = tmp_path / "bad"
  _copy_at(two, bad, HALF)
  proc = _one_process(tmp_path, bad, "--config.train.batch_size=2")
  assert proc.returncode != 0
  assert "global batch size 4, this run has train.batch_size=2" in proc.stderr, \
      proc.stderr[-3000:]
  assert "compiling the train" not in proc.stderr


# ------------------------------------------------- the data position, in-process, per source

from loopjax import data as D  # noqa: E402
from loopjax.data import reshard  # noqa: E402
from loopjax.data.prepare import write_tokenized  # noqa: E402
from loopjax.data.process_rows import make_shards_iterator  # noqa: E402

G, K = 4, 3  # global batch, steps consumed before the checkpoint


def _source(kind, tmp):
  if kind == "sudoku":
    return dict(source="sudoku")
  if kind == "prepared":
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, rng.integers(1, 30)) for _ in range(60)]
    out = str(tmp / "corpus")
    write_tokenized(out, docs, "byte", heldout_every=10, shard_tokens=500)
    return dict(source="prepared", path=out, seq_len=16, prefetch=0)
  path = tmp / "docs.txt"
  path.write_text("\n\n".join(f"doc {i} " + "word " * (i % 9 + 1) for i in range(40)))
  return dict(source="text", paths=str(path), seq_len=16, eval_examples=4,
              packing=kind == "packed text", prefetch=0)


def _open(cfg, shards):
  c = D.default_data_config()
  c.update(cfg)
  return make_shards_iterator(c, global_batch_size=G, seed=0, shards=shards)


def _saved_states(cfg, layout):
  """Every shard state of a run of `layout` (shards per process) after K steps, as JSON."""
  states = []
  for shards in layout:
    it = _open(cfg, shards)
    for _ in range(K):
      next(it)
    states += reshard.shard_states(json.loads(json.dumps(it.get_state())))
    it.close()
  return states


@pytest.mark.parametrize("kind", ["sudoku", "text", "packed text", "prepared",
                                  "prepared, saved by grain workers"])
def test_rederived_position_continues_the_stream_on_any_layout(kind, tmp_path):
  cfg = _source(kind.split(",")[0], tmp_path)
  ref = _open(cfg, [(0, 1)])
  want = [next(ref) for _ in range(K + 2)][K:]  # global batches K+1, K+2
  ref.close()
  layouts = [[[(0, 2)], [(1, 2)]], [[(0, 4), (2, 4)], [(1, 4), (3, 4)]]]
  for saved_layout in layouts[:1] if "workers" in kind else layouts:
    # Two grain worker processes per saving process; the continuation runs none.
    saved = _saved_states(dict(cfg, workers=2) if "workers" in kind else cfg, saved_layout)
    # One process for all rows; a process of non-adjacent shards (rows 0 and 3).
    for shards, rows in (([(0, 1)], [0, 1, 2, 3]), ([(0, 4), (3, 4)], [0, 3])):
      it = _open(cfg, shards)
      mine = it.get_state()
      new = reshard.rederive(saved, reshard.shard_states(mine), global_batch_size=G, step=K)
      it.set_state(dict(mine, shards=new) if "shards" in mine else new[0])
      for w in want:
        got = next(it)
        for k in D.BATCH_KEYS:
          np.testing.assert_array_equal(got[k], w[k][rows], err_msg=f"{kind} {shards} {k}")
      it.close()


def test_rederive_refuses_what_cannot_continue_exactly(tmp_path):
  cfg = _source("sudoku", tmp_path)
  saved = _saved_states(cfg, [[(0, 2)], [(1, 2)]])
  it = _open(cfg, [(0, 1)])
  fresh = reshard.shard_states(it.get_state())
  it.close()
  with pytest.raises(reshard.ResumeLayoutError, match="global batch size 4, this run has 8"):
    reshard.rederive(saved, [dict(f, fingerprint=dict(f["fingerprint"], global_batch_size=8))
                             for f in fresh], global_batch_size=8, step=K)
  with pytest.raises(reshard.ResumeLayoutError, match="stands at batch 3, not at the"):
    reshard.rederive(saved, fresh, global_batch_size=G, step=K + 1)
  with pytest.raises(reshard.ResumeLayoutError, match="cover 2 distinct rows"):
    reshard.rederive(saved[:1], fresh, global_batch_size=G, step=K)
  other = [dict(f, fingerprint=dict(f["fingerprint"], seed=7)) for f in fresh]
  with pytest.raises(reshard.ResumeLayoutError, match="seed: saved 0 vs now 7"):
    reshard.rederive(saved, other, global_batch_size=G, step=K)
  workers = [dict(s, grain={"workers_state": {}}) for s in saved]
  with pytest.raises(reshard.ResumeLayoutError, match="not per row"):
    reshard.rederive(workers, fresh, global_batch_size=G, step=K)
