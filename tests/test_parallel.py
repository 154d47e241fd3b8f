"""Sharded and multi-process training: the same losses on every mesh and process layout, weights
that really are sharded, checkpoints that move between meshes, clear errors for bad meshes, and
the per-device memory report.

Multi-device cases run in subprocesses with 8 fake CPU devices (the pytest process has one). All
share one module fixture: a 1-device reference and an 8-device driver, side by side, the driver
training on several meshes in turn and then running the one-command checks; then a 2-process x
4-device job alone. With the session's compilation cache the file stays within a few minutes on
2 cores. Every run has a deadline and a failure reports each process's exit code and the tail of
its output (tests/multihost.py).
"""

import importlib.util
import json
import os
import sys
import textwrap
import time
from types import SimpleNamespace

import multihost as mp
import numpy as np
import pytest
from multihost import EXPERIMENT, ROOT
from run_logs import logged_losses

from loopjax.parallel import mesh as mesh_lib

STEPS, HALF = 6, 3
TINY = mp.TINY + [f"--config.train.checkpoint_every={HALF}"]
# Float32 sums in another order (sharded reductions): equal to ~1e-6; a wrong batch slice,
# a dropped gradient shard or a mis-restored optimizer moves the loss by 1e-2 or more.
RTOL = 1e-5
# Deadline (s) for the reference and for the 8-device driver (the 2-process jobs have the
# harness's): they take 1-5 min on a 2-core machine loaded 5x over.
DRIVER_TIMEOUT = 1200


def _mesh(d, f, t):
  return [f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}"]


# Trains each (name, workdir, overrides) of argv[2] in turn in one process and records the
# shardings it ended with; then runs each `loopjax` command of argv[3] (a name: its argv) and
# records its exit code and output (one JAX start-up for all of them).
DRIVER = textwrap.dedent("""
  import contextlib, io, json, sys, traceback
  import jax
  from loopjax.cli import main
  from loopjax.config.load import load_config
  from loopjax.train.loop import train
  spec = lambda x: [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec]
  out = {}
  for name, workdir, overrides in json.loads(sys.argv[2]):
    res = train(load_config(sys.argv[1], overrides), workdir)
    st = res["state"]
    flat = lambda tree: {jax.tree_util.keystr(p): x for p, x in
                         jax.tree_util.tree_leaves_with_path(tree)}
    mu = st.opt_state[1][0].mu
    out[name] = {
        "devices": jax.device_count(),
        "params": {k: [spec(x), list(x.addressable_shards[0].data.shape), list(x.shape)]
                   for k, x in flat(st.params).items()},
        "mu": {k: spec(x) for k, x in flat(mu).items()},
        "ema": {k: spec(x) for k, x in flat(st.ema_params).items()}}
  for name, argv in json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}").items():
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      try:
        code = main(argv)
      except SystemExit as e:
        code = e.code
      except Exception:  # a bug: reported as this command's result, the others still run
        traceback.print_exc()
        code = "traceback"
    out[name] = dict(code=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())
  print("RESULT " + json.dumps(out), flush=True)
""")

BAD_MESHES = [
    (_mesh(3, 1, 1), "has 3 devices but 8 are available"),
    (_mesh(-1, 3, 1), "do not divide the 8 available devices"),
    (_mesh(4, 2, 1) + ["--config.train.batch_size=12"],
     "train.batch_size 12 must be divisible by the data-parallel size 8"),
]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _losses(workdir):
  out = logged_losses(workdir)
  return [out[s] for s in sorted(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("parallel")
  w = lambda name: str(tmp / name)
  steps = lambda n: [f"--config.train.steps={n}"]
  started = []
  try:
    plan = lambda *runs: json.dumps([list(r) for r in runs])
    started.append(mp.driver("ref", tmp, DRIVER, EXPERIMENT,
                             plan(["ref", w("ref"), TINY + steps(STEPS) + _mesh(1, 1, 1)]),
                             timeout=DRIVER_TIMEOUT))
    started.append(mp.driver("eight", tmp, DRIVER, EXPERIMENT, plan(
        ["m811", w("m811"), TINY + steps(STEPS) + _mesh(8, 1, 1)],
        ["m181", w("m181"), TINY + steps(STEPS) + _mesh(1, 8, 1)],
        ["m222", w("m222"), TINY + steps(STEPS) + _mesh(2, 2, 2)],
        # Saved under fsdp=8, resumed under data=fsdp=tensor=2 (programs already compiled above).
        ["moved_first", w("moved"), TINY + steps(HALF) + _mesh(1, 8, 1)],
        ["moved", w("moved"), TINY + steps(STEPS) + _mesh(2, 2, 2)],
    ), json.dumps(_commands(tmp)), devices=8, timeout=DRIVER_TIMEOUT))
    out = {**started[0].result(), **started[1].result()}
    # Two processes x 4 devices: train to HALF (checkpoint), then a new job resumes to STEPS.
    # Alone, so that its processes, which meet at barriers and collectives, compete with as
    # little else as possible.
    mp_log = ""
    for n in (HALF, STEPS):
      started.append(mp.job(f"mp_to_{n}", tmp, ["loopjax", "train", "--config", EXPERIMENT,
                                                "--workdir", w("mp"), *TINY, *steps(n),
                                                *_mesh(2, 2, 2)], devices=4))
      mp_log += started[-1].output()
  finally:
    for p in started:
      p.kill()
  return SimpleNamespace(out=out, dir=w, mp_log=mp_log, tmp=tmp,
                         **{name: SimpleNamespace(**out[name]) for name in _commands(tmp)})


def _commands(tmp):
  """The bad-mesh trainings and the memory reports, run after the 8-device trainings."""
  runs = {f"bad{i}": ["train", "--config", EXPERIMENT, "--workdir", str(tmp / f"bad{i}"), *TINY,
                      *extra] for i, (extra, _) in enumerate(BAD_MESHES)}
  runs["memory"] = ["memory", "--config", EXPERIMENT, *TINY, "--mesh", "fsdp=8", "--json"]
  if HAS_LIBTPU:  # an ahead-of-time compile for TPU devices, whatever this process's devices
    runs["tpu_memory"] = ["memory", "--config", EXPERIMENT, *TINY, "--topology", "v5e:2x2",
                          "--mesh", "fsdp=4", "--json"]
  return runs


def test_meshes_match_one_device_and_shard_weights(runs):
  ref = _losses(runs.dir("ref"))
  assert len(ref) == STEPS and runs.out["ref"]["devices"] == 1
  for name in ("m811", "m181", "m222"):
    assert runs.out[name]["devices"] == 8
    np.testing.assert_allclose(_losses(runs.dir(name)), ref, rtol=RTOL,
                               err_msg=f"mesh {name} trains differently from one device")
  key = lambda part: next(k for k in runs.out["m222"]["params"] if part in k)
  q, wi, emb = key("['attn']['query']['kernel']"), key("['mlp']['wi']['kernel']"), \
      key("['embed']['embedding']")
  # data=8: every weight whole on every device.
  assert all(shard == shape for _, shard, shape in runs.out["m811"]["params"].values())
  # fsdp=8: the embed dimension (32) is split 8 ways: layers x embed x heads x head_dim.
  assert runs.out["m181"]["params"][q] == [[None, "fsdp", "tensor", None], [1, 4, 2, 16],
                                           [1, 32, 2, 16]]
  # 2x2x2: FSDP over embed and tensor parallelism over heads and the MLP.
  assert runs.out["m222"]["params"][q][:2] == [[None, "fsdp", "tensor", None], [1, 16, 1, 16]]
  assert runs.out["m222"]["params"][wi][:2] == [[None, "fsdp", "tensor"], [1, 16, 64]]
  # The embedding (9 + [MASK] rows) splits its rows over tensor and its width over fsdp.
  assert runs.out["m222"]["params"][emb] == [["tensor", "fsdp"], [5, 16], [10, 32]]
  # Parameters of every kind of stack are sharded: plain layers and the weight-shared loop.
  assert any("['loop']" in k for k in runs.out["m222"]["params"])
  for k, (spec, shard, shape) in runs.out["m181"]["params"].items():
    if k.endswith("['kernel']") and "time_embed" not in k:  # (256 x 16: tiny, replicated)
      assert np.prod(shard) * 8 == np.prod(shape), (k, spec)
  # Optimizer moments and EMA are sharded exactly like the parameters.
  for name in ("m181", "m222"):
    specs = {k: v[0] for k, v in runs.out[name]["params"].items()}
    assert runs.out[name]["ema"] == specs
    assert runs.out[name]["mu"] == specs


def test_checkpoint_moves_between_meshes(runs):
  assert sorted(os.listdir(os.path.join(runs.dir("moved"), "checkpoints"))) == [str(HALF),
                                                                               str(STEPS)]
  np.testing.assert_allclose(_losses(runs.dir("moved")), _losses(runs.dir("ref")), rtol=RTOL,
                             err_msg="saved under fsdp=8 and resumed under 2x2x2")


def test_two_processes_train_checkpoint_resume_like_one(runs):
  wd = runs.dir("mp")
  step_dir = os.path.join(wd, "checkpoints", str(HALF))
  # Every process wrote its part: its data-iterator state and its shards of the arrays.
  assert sorted(os.listdir(os.path.join(step_dir, "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(step_dir, "state")))
  assert "resumed" in runs.mp_log and f"at step {HALF}" in runs.mp_log
  # Only process 0 logs: one row per step, none duplicated.
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(_losses(wd), _losses(runs.dir("m222")), rtol=RTOL,
                             err_msg="2 processes x 4 devices vs 1 process x 8 devices")


# A stand-in process for the launcher: argv ends with --process-id I (the launcher appends it).
FAKE = textwrap.dedent("""
  import os, signal, sys, time
  mode, ready, i = sys.argv[1], sys.argv[2], int(sys.argv[-1])
  print(f"process {i} started", flush=True)
  if i == 0:  # would wait for its peer for ever, ignoring SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("waiting for the peer", flush=True)
    open(ready, "w").close()
    time.sleep(600)
  while not os.path.exists(ready):  # whichever started first, process 1 acts after process 0
    time.sleep(0.05)
  if mode == "fail":
    print("process 1 gives up", flush=True)
    sys.exit(3)
  time.sleep(600)
""")


def test_launcher_stops_peers_of_a_failed_process_and_says_who_did_what(tmp_path):
  launcher = mp.load_launcher()
  for mode, code, timeout in (("fail", 3, 300), ("hang", 124, 8)):
    log = tmp_path / f"{mode}.log"
    with open(log, "w") as out:
      start = time.monotonic()
      assert launcher.launch([sys.executable, "-c", FAKE, mode, str(tmp_path / f"{mode}.ready")],
                             2, 1, timeout=timeout, grace=1, out=out) == code, log.read_text()
    assert time.monotonic() - start < 60  # a failure ends the job at once, a hang at the timeout
    text = log.read_text()
    assert "[0] waiting for the peer" in text and "[1] process 1 started" in text
    if mode == "fail":
      assert "process 1 failed" in text and "process 1: exited with code 3;" in text
      # Ignored SIGTERM, so killed; its last lines are in the summary.
      assert "process 0: killed by SIGKILL (stopped after process 1 failed; killed after " \
          "ignoring SIGTERM" in text
      assert "    | process 1 gives up" in text and "    | waiting for the peer" in text
    else:
      assert f"timed out after {timeout} s; exit code 124" in text
      assert "process 0: killed by SIGKILL (stopped at the timeout" in text
      assert "process 1: killed by SIGTERM (stopped at the timeout)" in text


# One process of a 2-process job fails while its peer waits for it at a barrier.
FAILING = textwrap.dedent("""
  import sys
  from loopjax.parallel import distributed
  coordinator, n, i = sys.argv[-5], int(sys.argv[-3]), int(sys.argv[-1])
  distributed.maybe_initialize(coordinator, n, i)
  with distributed.session("test"):
    if i == 1:
      raise ValueError("process 1 cannot go on")
    distributed.barrier("never_passed")
""")


def test_a_failing_process_exits_at_once_with_its_error(tmp_path):
  log = tmp_path / "job.log"
  with open(log, "w") as out:
    start = time.monotonic()
    code = mp.load_launcher().launch([sys.executable, "-c", FAILING], 2, 1,
                                     timeout=mp.JOB_TIMEOUT, env=mp.env(), cwd=ROOT, grace=5,
                                     out=out)
  text = log.read_text()
  # Not after JAX's shutdown timeout (BARRIER_TIMEOUT, longer than the launcher's, which would
  # have stopped the job with code 124): the failed process skips the shutdown barrier.
  assert code == 2, text
  assert time.monotonic() - start < mp.JOB_TIMEOUT < mp.BARRIER_TIMEOUT, text
  assert "[1] loopjax test: error: process 1 cannot go on" in text
  assert "process 1: exited with code 2;" in text
  # (JAX's preemption notifier catches SIGTERM, so the launcher may have to SIGKILL it.)
  assert "process 0: killed by SIG" in text and "(stopped after process 1 failed" in text


@pytest.mark.parametrize("case", range(len(BAD_MESHES)),
                         ids=["too_few_devices", "not_dividing", "batch_not_divisible"])
def test_bad_mesh_or_batch_fails_before_anything_runs(runs, case):
  r, message = getattr(runs, f"bad{case}"), BAD_MESHES[case][1]
  assert r.code == 2, r.stderr[-2000:]
  assert message in r.stderr
  # Refused before the workdir, the data and any compilation.
  assert not (runs.tmp / f"bad{case}").exists()


def test_mesh_shape_and_spec_fitting():
  assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 16) == (4, 2, 2)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="unknown key"):
    mesh_lib.mesh_shape({"dp": 8}, 8)
  mesh = SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 2})
  from jax.sharding import PartitionSpec as P
  # A 9-token vocabulary cannot split over tensor=2: that dimension stays whole.
  assert mesh_lib.fit_spec(mesh, P("tensor", "fsdp"), (9, 32)) == P(None, "fsdp")
  assert mesh_lib.fit_spec(mesh, P(("data", "fsdp"), None), (16, 3)) == P(("data", "fsdp"), None)
  assert mesh_lib.fit_spec(mesh, P(("data", "fsdp"), None), (12, 3)) == P(None, None)


def test_hybrid_mesh_puts_dcn_axes_across_slices():
  fake = lambda i, **kw: SimpleNamespace(id=i, platform="fake", device_kind="fake", **kw)
  devs = [fake(i, slice_index=i // 4, process_index=i // 2) for i in range(8)]
  # Default: data spans the two slices; fsdp (inside a slice) stays on ICI.
  grid = mesh_lib.device_grid({"data": -1, "fsdp": 4, "tensor": 1}, devs)
  assert grid.shape == (2, 4, 1)
  assert [{d.slice_index for d in row.ravel()} for row in grid] == [{0}, {1}]
  # dcn_fsdp=2: the fsdp axis crosses slices, data and tensor stay inside one.
  grid = mesh_lib.device_grid({"data": 2, "fsdp": 2, "tensor": 2, "dcn_fsdp": 2}, devs)
  assert [{d.slice_index for d in grid[:, f].ravel()} for f in range(2)] == [{0}, {1}]
  with pytest.raises(ValueError, match="multiply to 4 but the devices form 2"):
    mesh_lib.device_grid({"data": -1, "dcn_data": 4}, devs)
  # Multi-node GPU: dcn_* set and no slices, hosts are the granules.
  gpus = [fake(i, process_index=i // 4) for i in range(8)]
  grid = mesh_lib.device_grid({"data": -1, "fsdp": 4, "dcn_data": 2}, gpus)
  assert [{d.process_index for d in row.ravel()} for row in grid] == [{0}, {1}]


def test_memory_report_shows_fsdp_sharding(runs):
  r = runs.memory
  assert r.code == 0, r.stderr[-3000:]
  rep = json.loads(r.stdout.strip().splitlines()[-1])
  assert rep["num_devices"] == 8 and rep["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert rep["params_global"] == 4 * rep["param_count"]  # float32
  # FSDP: each device holds about 1/8 of the weights (small replicated biases aside).
  assert rep["params_global"] / 8 <= rep["params"] < rep["params_global"] / 4
  assert rep["ema_params"] == rep["params"]
  assert 2 * rep["params"] <= rep["opt_state"] <= 2 * rep["params"] + 64  # Adam mu, nu (+count)
  assert rep["temp"] > 0 and rep["total"] >= rep["params"] + rep["ema_params"] + rep["opt_state"]


@pytest.mark.skipif(not HAS_LIBTPU, reason="TPU ahead-of-time compile needs the libtpu wheel")
def test_memory_report_for_a_tpu_topology(runs):
  r = runs.tpu_memory
  assert r.code == 0, r.stderr[-3000:]
  rep = json.loads(r.stdout.strip().splitlines()[-1])
  assert rep["device_kind"].startswith("TPU v5") and rep["num_devices"] == 4
  assert rep["fits"] and rep["device_memory"] == 16 * 1024 ** 3
