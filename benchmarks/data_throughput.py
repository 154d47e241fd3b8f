"""Throughput of the prepared-data path: reading + shuffling + packing + batching, and prepare.

  python benchmarks/data_throughput.py              # pipeline, prepare (1 and 2 workers), RSS
  python benchmarks/data_throughput.py --quick      # a short check that it works
  python benchmarks/data_throughput.py --rss        # only the peak-RSS-vs-corpus-size check

Pipeline: a corpus of `--tokens` random token ids (document lengths log-normal around
`--doc-len`) written directly as shards (no tokenization); tokens/s of this process's
`make_train_iterator` at seq_len x rows (MDLM wrap, no prefetch thread, so wall time is the
work of one thread). Prepare: generated English-like JSONL files tokenized with a BPE
tokenizer.json trained on them, with 1 and 2 worker processes. RSS: peak RSS (VmHWM) of a
fresh process iterating the same batches from a corpus of X and 10X tokens.
Writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
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


def make_corpus(out: str, num_tokens: int, mean_len: int) -> dict:
  return write_tokenized(out, _docs(num_tokens, mean_len, 256), "byte",
                         shard_tokens=50_000_000)


def _cfg(path: str, seq_len: int, **kw):
  c = D.default_data_config()
  c.update(dict(source="prepared", path=path, seq_len=seq_len, prefetch=0, **kw))
  return c


def pipeline(path: str, *, seq_len: int, rows: int, batches: int, wrap: str) -> dict:
  it = D.make_train_iterator(_cfg(path, seq_len, wrap=wrap), global_batch_size=rows, seed=0)
  for _ in range(3):
    next(it)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  it.close()
  tokens = batches * rows * seq_len
  return {"wrap": wrap, "seq_len": seq_len, "rows": rows, "batches": batches,
          "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu}


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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=150_000_000, help="pipeline corpus size")
  p.add_argument("--doc-len", type=int, default=1000, help="mean document length (tokens)")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--batches", type=int, default=300)
  p.add_argument("--prepare-mb", type=float, default=20.0, help="text for the prepare run")
  p.add_argument("--quick", action="store_true", help="small sizes: check that it works")
  p.add_argument("--rss", action="store_true", help="only the peak-RSS check")
  p.add_argument("--note", default="", help="stored with the results (e.g. 'under load')")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                               "data_throughput.json"))
  a = p.parse_args(argv)
  if a.quick:
    a.tokens, a.batches, a.prepare_mb = 20_000_000, 60, 4.0
  res = {"machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                    f"python {platform.python_version()}",
         "load_average": os.getloadavg(), "note": a.note, "command": " ".join(sys.argv)}
  with tempfile.TemporaryDirectory() as tmp:
    if not a.rss:
      path = os.path.join(tmp, "corpus")
      t0 = time.perf_counter()
      m = make_corpus(path, a.tokens, a.doc_len)
      res["corpus"] = {"tokens": m["splits"]["train"]["tokens"],
                       "docs": m["splits"]["train"]["docs"],
                       "mb": sum(s["bytes"] for s in m["splits"]["train"]["shards"]) / 1e6,
                       "write_s": time.perf_counter() - t0}
      res["pipeline"] = [pipeline(path, seq_len=a.seq_len, rows=a.rows, batches=a.batches,
                                  wrap=w) for w in ("mdlm", "document")]
      for r in res["pipeline"]:
        print(f"pipeline {r['wrap']:>8}: {r['tokens_per_s'] / 1e6:6.2f}M tokens/s "
              f"({r['tokens_per_cpu_s'] / 1e6:.2f}M per CPU-s), {a.rows} x {a.seq_len}")
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
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
