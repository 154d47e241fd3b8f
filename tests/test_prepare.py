"""`loopjax prepare` and the `prepared` source: formats, resume, worker and process invariance,
packing against a reference built from the shards, and bad input."""

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from loopjax import data as D
from loopjax.data import corpus, prepared, shards
from loopjax.cli.prepare import main as prepare_main
from loopjax.data.prepare import prepare, write_tokenized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a cat dog sat on mat ran far away quick brown fox jumps over lazy".split()


def _docs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [f"{i} " + " ".join(rng.choice(WORDS, rng.integers(2, 40))) for i in range(n)]


def _jsonl(path, docs, field="text"):
  path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
  return str(path)


def _corpus_dir(tmp_path, files=3, per_file=80):
  d = tmp_path / "raw"
  d.mkdir()
  docs = []
  for f in range(files):
    part = _docs(per_file, seed=f)
    _jsonl(d / f"c{f}.jsonl", part)
    docs += part
  return str(d), docs


def _records(out_dir, split):
  m = shards.load_manifest(out_dir)
  src = prepared.split_documents(out_dir, m, split) if m["splits"][split]["docs"] else []
  return [np.asarray(src[i]) for i in range(len(src))]


def _tree_bytes(out_dir):
  """Every shard and the manifest, by relative path."""
  out = {}
  for sub in ("train", "heldout", "parts"):
    for name in sorted(os.listdir(os.path.join(out_dir, sub))):
      with open(os.path.join(out_dir, sub, name), "rb") as f:
        out[f"{sub}/{name}"] = f.read()
  with open(os.path.join(out_dir, "manifest.json"), "rb") as f:
    out["manifest.json"] = f.read()
  return out


def _hf_tokenizer(tmp_path, docs):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  text = tmp_path / "tok_train.txt"
  text.write_text("\n".join(docs))
  hf = Tokenizer(models.BPE(unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.train([str(text)], trainers.BpeTrainer(vocab_size=120,
                                            special_tokens=["<unk>", "<pad>", "<|endoftext|>"]))
  path = tmp_path / "tokenizer.json"
  hf.save(str(path))
  return f"hf:{path}"


def _cfg(path, **kw):
  cfg = D.default_data_config()
  cfg.update({**dict(source="prepared", path=str(path), seq_len=32, prefetch=0), **kw})
  return cfg


# ---------------------------------------------------------------- prepare


def test_each_input_format_gives_the_documents(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  docs = _docs(30)
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "a.txt").write_text("\n\n".join(d.replace(" on ", "\non ") for d in docs[:10]) + "\n")
  _jsonl(raw / "b.jsonl", docs[10:15], field="body")
  table = pa.table({"body": docs[15:20], "n": list(range(5))})
  pq.write_table(table, str(raw / "c.parquet"))
  with pa.OSFile(str(raw / "d.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
    w.write_table(pa.table({"body": docs[20:25], "n": list(range(5))}))
  with pa.OSFile(str(raw / "e.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
    w.write_table(pa.table({"body": docs[25:30], "n": list(range(5))}))
  files = corpus.list_inputs([str(raw)])
  assert [os.path.basename(f) for f in files] == ["a.txt", "b.jsonl", "c.parquet", "d.arrow",
                                                  "e.arrow"]
  got = [d for f in files[1:] for d in corpus.iter_documents(f, text_field="body")]
  assert got == docs[10:]
  assert list(corpus.iter_documents(files[0])) == [d.replace(" on ", "\non ") for d in docs[:10]]
  out = str(tmp_path / "out")
  m = prepare([str(raw / "b.jsonl"), str(raw / "c.parquet"), str(raw / "d.arrow"),
               str(raw / "e.arrow")], "byte", out, text_field="body", heldout=0.3,
              progress=False)
  want = {d for d in docs[10:]}
  heldout = {d for d in want if shards.is_heldout(d, 0.3)}
  assert 0 < len(heldout) < len(want)
  dec = {s: {bytes(r.tolist()).decode() for r in _records(out, s)} for s in shards.SPLITS}
  assert dec["heldout"] == heldout and dec["train"] == want - heldout
  assert m["splits"]["train"]["docs"] + m["splits"]["heldout"]["docs"] == 20
  assert m["splits"]["train"]["tokens"] == sum(len(d.encode()) for d in want - heldout)
  assert m["dtype"] == "uint16" and m["eos_id"] == 256


def test_lm1b_style_raw_files_with_a_heldout_set(tmp_path, capsys):
  train, test = tmp_path / "train", tmp_path / "test"
  train.mkdir()
  test.mkdir()
  docs = _docs(30)
  for k in range(2):  # LM1B's release: one sentence per line, no file extension
    (train / f"news.en-0000{k}-of-00002").write_text("\n".join(docs[k * 10:(k + 1) * 10]))
  (test / "news.en.heldout-00000-of-00001").write_text("\n".join(docs[20:]) + "\n")
  out = str(tmp_path / "out")
  assert prepare_main(["--input", str(train), "--heldout-input", str(test), "--format", "txt",
                       "--txt-split", "line", "--tokenizer", "byte", "--out", out,
                       "--heldout", "0", "--workers", "1"]) == 0
  assert "train 20 docs" in capsys.readouterr().out
  dec = {s: [bytes(r.tolist()).decode() for r in _records(out, s)] for s in shards.SPLITS}
  assert dec == {"train": docs[:20], "heldout": docs[20:]}
  m = shards.load_manifest(out)
  assert m["command"].startswith("loopjax prepare --input")
  assert len(m["heldout_inputs"]) == 1 and len(m["inputs"]) == 2


def test_hf_tokenizer_ids_and_stats(tmp_path, capsys):
  raw, docs = _corpus_dir(tmp_path, files=1, per_file=40)
  spec = _hf_tokenizer(tmp_path, docs)
  out = str(tmp_path / "out")
  m = prepare([raw], spec, out, heldout=0.0, progress=False)
  tok = D.make_tokenizer(spec)
  recs = _records(out, "train")
  assert [r.tolist() for r in recs] == [tok.encode(d) for d in docs]
  assert m["tokenizer"]["sha256"] == tok.describe()["sha256"]
  assert m["eos_id"] == tok.eos_id == m["bos_id"]
  assert prepare_main(["--stats", "--out", out]) == 0
  printed = capsys.readouterr().out
  assert f"train: 40 documents, {sum(r.size for r in recs):,} tokens" in printed
  assert "heldout: 0 documents" in printed


def test_killed_prepare_resumes_to_identical_shards(tmp_path):
  raw, _ = _corpus_dir(tmp_path)
  ref = str(tmp_path / "ref")
  prepare([raw], "byte", ref, shard_tokens=1500, heldout=0.2, progress=False)
  assert len(os.listdir(os.path.join(ref, "parts"))) > 6
  out = str(tmp_path / "out")
  with pytest.raises(KeyboardInterrupt):
    prepare([raw], "byte", out, shard_tokens=1500, heldout=0.2, progress=False,
            _stop_after_parts=2)
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  with pytest.raises(ValueError, match="no manifest.json"):
    shards.load_manifest(out)
  done = sorted(os.listdir(os.path.join(out, "parts")))
  assert done == ["00000-00000.json", "00000-00001.json"]
  kept = os.path.getmtime(os.path.join(out, "train", "00000-00000.arrayrecord"))
  prepare([raw], "byte", out, shard_tokens=1500, heldout=0.2, progress=False)
  assert os.path.getmtime(os.path.join(out, "train", "00000-00000.arrayrecord")) == kept
  assert _tree_bytes(out) == _tree_bytes(ref)
  assert not [f for sub in ("train", "heldout") for f in os.listdir(os.path.join(out, sub))
              if f.endswith(".tmp")]
  with pytest.raises(ValueError, match="different"):
    prepare([raw], "byte", out, shard_tokens=999, heldout=0.2, progress=False)


def test_sigkilled_prepare_resumes_to_identical_shards(tmp_path):
  import signal
  import time
  raw, _ = _corpus_dir(tmp_path, files=8, per_file=800)
  args = ["--input", raw, "--tokenizer", "byte", "--shard-tokens", "20000", "--workers", "2"]
  out = str(tmp_path / "out")
  cmd = [sys.executable, "-m", "loopjax.cli.prepare", *args, "--out", out]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  parts = os.path.join(out, "parts")
  t0 = time.time()
  while time.time() - t0 < 120 and proc.poll() is None and \
      len(os.listdir(parts) if os.path.isdir(parts) else []) < 3:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(out, "manifest.json")), "finished before the kill"
  assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
  ref = str(tmp_path / "ref")
  prepare_main([*args, "--workers", "1", "--out", ref])
  got, want = _tree_bytes(out), _tree_bytes(ref)
  assert json.loads(got.pop("manifest.json"))["splits"] == \
      json.loads(want.pop("manifest.json"))["splits"]  # the commands differ (--out)
  assert got == want


def test_one_and_two_workers_give_identical_shards(tmp_path):
  raw, _ = _corpus_dir(tmp_path)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  prepare([raw], "byte", one, shard_tokens=2000, heldout=0.1, num_workers=1, progress=False)
  prepare([raw], "byte", two, shard_tokens=2000, heldout=0.1, num_workers=2, progress=False)
  assert _tree_bytes(one) == _tree_bytes(two)


# ---------------------------------------------------------------- the prepared source


@pytest.fixture(scope="module")
def token_corpus(tmp_path_factory):
  """A corpus of 300 documents of ids 1..200 (byte vocabulary), every 10th held out."""
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 256, rng.integers(1, 50)) for _ in range(300)]
  out = str(tmp_path_factory.mktemp("tokens") / "corpus")
  write_tokenized(out, docs, "byte", heldout_every=10, shard_tokens=2000)
  return out, docs


def _slot_streams(out, g, seed, window, epochs):
  """Reference, from the module's stated rule: per epoch the train shards in the order
  default_rng([seed, 0, epoch]).permutation, slot s taking positions [s*N//g, (s+1)*N//g) of
  their concatenation in windows of `window`, each reordered by
  default_rng([seed, 1, epoch, s, window start]).permutation. Documents read with grain's own
  ArrayRecord source, shard by shard."""
  m = shards.load_manifest(out)
  per_shard = []
  for e in m["splits"]["train"]["shards"]:
    src = grain.sources.ArrayRecordDataSource([os.path.join(out, e["path"])])
    per_shard.append([np.frombuffer(src[i], m["dtype"]) for i in range(len(src))])
  n = sum(len(d) for d in per_shard)
  streams = [[] for _ in range(g)]
  for ep in range(epochs):
    docs = [d for k in np.random.default_rng([seed, 0, ep]).permutation(len(per_shard))
            for d in per_shard[k]]
    for s in range(g):
      lo, hi = s * n // g, (s + 1) * n // g
      for w in range(lo, hi, window):
        size = min(window, hi - w)
        perm = np.random.default_rng([seed, 1, ep, s, w - lo]).permutation(size)
        streams[s] += [docs[w + p] for p in perm]
  return streams, n


@pytest.mark.parametrize("wrap", ["mdlm", "document"])
def test_rows_pack_each_slots_range_of_the_shuffled_shards(token_corpus, wrap):
  out, docs = token_corpus
  g, n, window = 4, 12, 16
  it = D.make_train_iterator(_cfg(out, wrap=wrap, shuffle_window=window), global_batch_size=g,
                             seed=3)
  batches = [next(it) for _ in range(n)]
  it.close()
  streams, total = _slot_streams(out, g, seed=3, window=window, epochs=2)
  assert total == 270 and len(shards.load_manifest(out)["splits"]["train"]["shards"]) > 2
  for s in range(g):
    stream = np.concatenate([np.append(d, 256) for d in streams[s]])
    rows = np.stack([b["tokens"][s] for b in batches])
    if wrap == "mdlm":
      assert (rows[:, 0] == 256).all() and (rows[:, -1] == 256).all()
      np.testing.assert_array_equal(rows[:, 1:-1].ravel(), stream[:n * 30])
      assert all((b["segment_ids"] == 1).all() for b in batches)
    else:
      np.testing.assert_array_equal(rows.ravel(), stream[:n * 32])
      seg = np.stack([b["segment_ids"][s] for b in batches])
      ends = np.cumsum(np.r_[0, stream[:n * 32 - 1] == 256].reshape(n, 32), axis=1)
      np.testing.assert_array_equal(seg, 1 + ends - ends[:, :1])
  for b in batches:
    D.validate_batch(b, vocab_size=257, seq_len=32)
    assert b["loss_mask"].all() and not b["fixed"].any()
  # An epoch of the slots is every train document once; the next epoch orders them anew.
  first = [tuple(d.tolist()) for s in range(g) for d in streams[s][:len(streams[s]) // 2]]
  train_docs = [tuple(d) for i, d in enumerate(docs) if i % 10]
  assert sorted(first) == sorted(train_docs)
  assert [tuple(d) for d in streams[0][:67]] != [tuple(d) for d in streams[0][67:134]]


@pytest.mark.parametrize("wrap", ["mdlm", "document"])
def test_two_processes_read_the_one_process_rows(token_corpus, wrap):
  out, _ = token_corpus
  cfg = _cfg(out, wrap=wrap)
  whole = D.make_train_iterator(cfg, global_batch_size=6, seed=1)
  parts = [D.make_train_iterator(cfg, global_batch_size=6, seed=1, process_index=p,
                                 process_count=2) for p in range(2)]
  for _ in range(8):
    b = next(whole)
    got = [next(p) for p in parts]
    for k in D.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([x[k] for x in got]), b[k])
  for i in [whole, *parts]:
    i.close()


def test_resume_from_a_saved_state(token_corpus):
  out, _ = token_corpus
  cfg = _cfg(out, prefetch=2)
  it = D.make_train_iterator(cfg, global_batch_size=4, seed=0)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(30)]  # past the end of the first epoch
  it.close()
  again = D.make_train_iterator(cfg, global_batch_size=4, seed=0)
  again.set_state(state)
  for w in want:
    g = next(again)
    for k in D.BATCH_KEYS:
      np.testing.assert_array_equal(g[k], w[k])
  again.close()
  other = D.make_train_iterator(_cfg(out, wrap="document"), global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="wrap"):
    other.set_state(state)
  other.close()


def test_worker_processes_give_the_same_batches_and_resume_with_another_count(token_corpus):
  out, _ = token_corpus
  ref = D.make_train_iterator(_cfg(out), global_batch_size=5, seed=2)
  want = [next(ref) for _ in range(12)]
  ref.close()
  got = []
  # 2 workers save; 3 workers resume from that state; then no worker process at all.
  for workers, n in ((2, 4), (3, 4), (0, 4)):
    it = D.make_train_iterator(_cfg(out, workers=workers), global_batch_size=5, seed=2)
    if got:
      it.set_state(state)
    got += [next(it) for _ in range(n)]
    state = json.loads(json.dumps(it.get_state()))
    assert set(state["grain"]) == {"doc", "offset"} and len(state["grain"]["doc"]) == 5
    it.close()
  for g, w in zip(got, want):
    for k in D.BATCH_KEYS:
      np.testing.assert_array_equal(g[k], w[k])


def test_eval_batches_are_the_heldout_documents_in_order(token_corpus):
  out, docs = token_corpus
  ev = D.make_eval_batches(_cfg(out, wrap="document"), batch_size=2, num_batches=3, seed=0)
  stream = np.concatenate([np.append(d, 256) for d in docs[::10]])
  np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in ev]).ravel(),
                                stream[:6 * 32])
  halves = [D.make_eval_batches(_cfg(out), batch_size=2, num_batches=3, seed=0,
                                process_index=p, process_count=2) for p in range(2)]
  full = D.make_eval_batches(_cfg(out), batch_size=2, num_batches=3, seed=0)
  for k in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][k]["tokens"], halves[1][k]["tokens"]]), full[k]["tokens"])
  with pytest.raises(ValueError, match="held-out split"):
    D.make_eval_batches(_cfg(out), batch_size=8, num_batches=50, seed=0)


def test_peak_rss_is_flat_in_corpus_size(tmp_path):
  script = ("import resource, sys\n"
            "from loopjax import data as D\n"
            "c = D.default_data_config()\n"
            "c.update(source='prepared', path=sys.argv[1], seq_len=1024, prefetch=0)\n"
            "it = D.make_train_iterator(c, global_batch_size=16, seed=0)\n"
            "for _ in range(40): next(it)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
  rss = []
  for n_docs in (2_000, 20_000):  # 2M and 20M tokens (4 and 40 MB of uint16 ids)
    rng = np.random.default_rng(0)
    out = str(tmp_path / f"c{n_docs}")
    write_tokenized(out, (rng.integers(0, 256, 1000) for _ in range(n_docs)), "byte",
                    shard_tokens=4_000_000)
    proc = subprocess.run([sys.executable, "-c", script, out], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss.append(int(proc.stdout.split()[-1]))
  assert rss[1] <= 1.2 * rss[0], rss


# ---------------------------------------------------------------- bad input


def test_missing_text_field_names_the_fields(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  raw = tmp_path / "raw"
  raw.mkdir()
  _jsonl(raw / "a.jsonl", _docs(3), field="content")
  with pytest.raises(ValueError, match=r"no text field 'text' \(fields present: \['content', "
                                       r"'id'\]\)"):
    prepare([str(raw / "a.jsonl")], "byte", str(tmp_path / "o"), progress=False)
  pq.write_table(pa.table({"body": ["x"]}), str(raw / "b.parquet"))
  with pytest.raises(ValueError, match=r"no text field 'text' .*\['body'\]"):
    prepare([str(raw / "b.parquet")], "byte", str(tmp_path / "o2"), progress=False)
  assert not os.path.exists(tmp_path / "o2")


def test_empty_corpus_and_missing_inputs(tmp_path):
  (tmp_path / "blank.txt").write_text("\n\n   \n")
  with pytest.raises(ValueError, match="no non-empty documents"):
    prepare([str(tmp_path / "blank.txt")], "byte", str(tmp_path / "o"), progress=False)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no corpus files"):
    prepare([str(tmp_path / "empty")], "byte", str(tmp_path / "o"), progress=False)
  with pytest.raises(FileNotFoundError):
    prepare([str(tmp_path / "nope.jsonl")], "byte", str(tmp_path / "o"), progress=False)


def test_cli_error_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "loopjax.cli.prepare", "--input",
                         str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.startswith("loopjax prepare: error: input") and "does not exist" in proc.stderr


def test_tokenizer_and_vocabulary_mismatch(tmp_path, token_corpus):
  out, docs = token_corpus
  spec = _hf_tokenizer(tmp_path, _docs(20))
  with pytest.raises(ValueError, match="not the tokenizer the corpus .* was prepared with: "
                                       "'byte'"):
    D.make_train_iterator(_cfg(out, tokenizer=spec), global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="not the tokenizer"):
    D.data_vocab_size(_cfg(out, tokenizer=spec))
  with pytest.raises(ValueError, match="no manifest.json"):
    D.make_train_iterator(_cfg(tmp_path), global_batch_size=2, seed=0)
  # Shards of another vocabulary: the manifest claims bytes, the shards hold larger ids.
  from tokenizers import Tokenizer, models
  big = tmp_path / "big.json"
  Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)}, unk_token="w0")).save(str(big))
  other = str(tmp_path / "other")
  write_tokenized(other, [np.arange(500, 520)] * 4, f"hf:{big}")
  path = shards.manifest_path(other)
  m = json.load(open(path))
  m["tokenizer"] = shards.load_manifest(out)["tokenizer"]
  json.dump(m, open(path, "w"))
  it = D.make_train_iterator(_cfg(other, seq_len=16, wrap="document"), global_batch_size=1,
                            seed=0)
  with pytest.raises(ValueError, match="another vocabulary"):
    next(it)
  it.close()
  m["dtype"] = "uint32"
  json.dump(m, open(path, "w"))
  with pytest.raises(ValueError, match="another vocabulary"):
    D.make_train_iterator(_cfg(other), global_batch_size=1, seed=0)


def test_truncated_or_corrupt_shard(tmp_path):
  out = str(tmp_path / "c")
  write_tokenized(out, [np.arange(50) % 256] * 40, "byte", shard_tokens=500)
  m = shards.load_manifest(out)
  first = os.path.join(out, m["splits"]["train"]["shards"][0]["path"])
  data = open(first, "rb").read()
  open(first, "wb").write(data[: len(data) // 2])
  # A shard is checked when a row first reads it; with 40 rows, every row reads one document.
  first_batch = lambda **kw: next(D.make_train_iterator(_cfg(out, **kw), global_batch_size=40,
                                                        seed=0))
  with pytest.raises(ValueError, match="truncated"):
    first_batch()
  flipped = bytearray(data)
  flipped[len(data) // 3] ^= 0xFF
  open(first, "wb").write(bytes(flipped))
  with pytest.raises(ValueError, match="sha256"):
    first_batch(verify_shards=True)
  os.remove(first)
  with pytest.raises(ValueError, match="missing"):
    first_batch()


# ---------------------------------------------------------------- end to end


def test_owt_recipe_trains_on_a_prepared_corpus_and_resumes_bitwise(tmp_path):
  """experiments/owt.py:loopmdm with size overrides reads a prepared corpus; a run stopped at a
  checkpoint and resumed logs the same losses as one that went straight through."""
  from loopjax.config.load import load_config
  from loopjax.train.loop import train
  raw, _ = _corpus_dir(tmp_path, files=2, per_file=60)
  out = str(tmp_path / "corpus")
  prepare([raw], "byte", out, heldout=0.1, progress=False)
  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "owt.py") + ":loopmdm"
  overrides = [f"--config.data.path={out}", "--config.data.tokenizer=byte",
               "--config.data.seq_len=32", "--config.data.prefetch=0",
               "--config.model.vocab_size=257", "--config.model.max_length=32",
               "--config.model.width=32", "--config.model.num_layers=3",
               "--config.model.num_heads=2", "--config.model.cond_dim=16",
               "--config.model.dtype=float32", "--config.model.remat=none",
               "--config.loops.train=uniform:1:2", "--config.train.batch_size=4",
               "--config.train.warmup_steps=2",  # the same schedule for 2 and 4 steps
               "--config.train.log_every=1", "--config.train.eval_every=1000",
               "--config.train.eval_batches=1", "--config.train.eval_time_points=2",
               "--config.train.checkpoint_every=2", "--config.train.async_checkpoints=False"]
  runs = {}
  for name, stops in (("straight", [4]), ("resumed", [2, 4])):
    wd = str(tmp_path / name)
    for steps in stops:
      train(load_config(spec, overrides + [f"--config.train.steps={steps}"]), wd)
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    runs[name] = rows
  losses = {k: [r["loss"] for r in rows] for k, rows in runs.items()}
  assert len(losses["straight"]) == 4 and np.isfinite(losses["straight"]).all()
  assert losses["resumed"] == losses["straight"]
  # The run records what it read: the corpus manifest, tokens seen and epochs.
  wd = tmp_path / "straight"
  assert json.load(open(wd / "data_manifest.json")) == json.load(open(os.path.join(out, "manifest.json")))
  last = runs["straight"][-1]
  assert last["tokens_seen"] == 4 * 4 * 32 and 0 < last["epochs"] < 1

