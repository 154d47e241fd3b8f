"""A two-process job (launch/local_multiprocess.py, one CPU device per process, data=2) stopped
by a signal to one process and its checkpoint resumed on every layout:

- the stop request reaches both processes, which save the same step and exit 0; resumed by a new
  two-process job, the run trains like an uninterrupted one-process two-device run;
- the same checkpoint resumes with another number of processes: the train state reshards onto
  the new mesh and each process's data position is re-derived from the step, so one process of
  two devices (the same mesh, the same arithmetic) continues with bitwise-equal losses and one
  process of one device (mesh data=1) with float32 rounding only;
- another global batch size is refused before anything compiles.

One job set for all of these (the in-process checks of the data position are in
test_resume_layout.py). Steps take milliseconds: the stop is agreed within a few steps of the
signal, long before the end; every wait has the harness's deadline, and nothing depends on which
process starts first."""

import json
import os
import re
import shutil
import signal
import time
from types import SimpleNamespace

import multihost as mp
import numpy as np
import pytest
from multihost import EXPERIMENT
from run_logs import logged_losses, logged_rows

STEPS = 200
TINY = mp.TINY + ["--config.train.checkpoint_every=100000", f"--config.train.steps={STEPS}",
                  "--config.mesh.data=-1"]
BATCH = 8  # mp.TINY's train.batch_size
# Float32 sums in another order: two processes of one device each vs one process of two devices;
# one device (a local sum per device, then no all-reduce of the two) vs two: rounding only.
RTOL, RTOL_ONE_DEVICE = 1e-5, 1e-6


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("preemption")
  work = tmp / "run"
  command = ["loopjax", "train", "--config", EXPERIMENT, "--workdir", work, *TINY]
  started = []
  try:
    stopped = mp.job("stopped", tmp, command)
    started.append(stopped)
    metrics = work / "metrics.jsonl"
    while time.monotonic() < stopped.deadline and stopped.poll() is None and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
      time.sleep(0.2)
    target = mp.process_pid(stopped.pid, 1)
    if stopped.poll() is not None or not target:
      pytest.fail("the job ended or never trained:\n" + stopped.wait(check=False)[1][-6000:],
                  pytrace=False)
    os.kill(target, signal.SIGTERM)  # process 1 only
    stopped_log = stopped.output()
    saved = {int(i): int(s) for i, s in
             re.findall(r"^\[(\d)\] .*saved checkpoint (\d+), stopping", stopped_log, re.M)}
    if set(saved) != {0, 1} or saved[0] != saved[1]:
      pytest.fail(f"each process should save the same step and stop: {saved}\n"
                  f"{stopped_log[-6000:]}", pytrace=False)
    stop = saved[0]
    listing = sorted((work / "checkpoints").iterdir())
    # The run folder as the stopped job left it, for the one-process resumes.
    copies = {name: tmp / name for name in ("one_2_devices", "one_1_device", "other_batch")}
    for d in copies.values():
      shutil.copytree(work, d)

    started.append(mp.job("resumed", tmp, command))
    resumed_log = started[-1].output()
    started.append(mp.train("ref", tmp, EXPERIMENT, tmp / "ref", *TINY, devices=2))
    started[-1].output()
    one = {}
    for devices in (2, 1):
      name = f"one_{devices}_device" + ("s" if devices > 1 else "")
      started.append(mp.train(name, tmp, EXPERIMENT, copies[name], *TINY, devices=devices))
      one[devices] = started[-1].output()
    started.append(mp.train("other_batch", tmp, EXPERIMENT, copies["other_batch"], *TINY,
                            f"--config.train.batch_size={BATCH // 2}", devices=1))
    other_batch = started[-1].wait(check=False)
  finally:
    for p in started:
      p.kill()
  return SimpleNamespace(tmp=tmp, work=work, stop=stop, listing=[p.name for p in listing],
                         resumed_log=resumed_log, copies=copies, one=one,
                         other_batch=other_batch)


def _losses(workdir, steps):
  got = logged_losses(workdir)
  return [got[s] for s in steps]


def test_sigterm_to_one_of_two_processes_saves_the_same_step_everywhere(jobs):
  assert jobs.stop < STEPS and jobs.listing == [str(jobs.stop)]
  # Every process wrote its part: its data-iterator state and its shards of the arrays.
  step_dir = jobs.work / "checkpoints" / str(jobs.stop)
  assert sorted(p.name for p in (step_dir / "data").iterdir()) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in (step_dir / "state").iterdir()}
  assert f"resumed {jobs.work} at step {jobs.stop}" in jobs.resumed_log
  # Only process 0 logs: one row per step, none duplicated.
  assert [r["step"] for r in logged_rows(jobs.work)] == list(range(1, STEPS + 1))
  every = range(1, STEPS + 1)
  np.testing.assert_allclose(_losses(jobs.work, every), _losses(jobs.tmp / "ref", every),
                             rtol=RTOL, err_msg="the stopped and resumed job trains differently")


def test_one_process_resumes_a_two_process_checkpoint(jobs):
  layout = json.loads((jobs.work / "checkpoints" / str(jobs.stop) / "layout" / "metadata")
                      .read_text())
  assert layout["process_count"] == 2 and layout["row_shards"] == [[[0, 2]], [[1, 2]]]
  after = range(jobs.stop + 1, STEPS + 1)
  want = _losses(jobs.work, after)  # the two-process job's own continuation
  for devices, out in jobs.one.items():
    one = jobs.copies[f"one_{devices}_device" + ("s" if devices > 1 else "")]
    assert f"resumed {one} at step {jobs.stop}" in out
    assert "data position re-derived" in out
    assert [r["step"] for r in logged_rows(one)] == list(range(1, STEPS + 1))
    got = _losses(one, after)
    if devices == 2:
      assert got == want, f"the one-process continuation trains differently: {got} vs {want}"
    else:
      np.testing.assert_allclose(got, want, rtol=RTOL_ONE_DEVICE,
                                 err_msg="the one-device continuation trains differently")


def test_another_global_batch_size_is_refused_before_any_compile(jobs):
  # Another global batch size cannot continue the same stream.
  code, out = jobs.other_batch
  assert code != 0
  assert f"global batch size {BATCH}, this run has train.batch_size={BATCH // 2}" in out, \
      out[-3000:]
  assert "compiling the train" not in out
