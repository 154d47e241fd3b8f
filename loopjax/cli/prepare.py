"""`loopjax prepare`: tokenize a corpus once into ArrayRecord token shards with a manifest.

Inputs: local text/JSONL/Parquet/Arrow files or folders, or datasets:NAME[:CONFIG][@SPLIT]
(a Hugging Face dataset through `datasets`, the `.[hf]` extra)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from loopjax.data.corpus import FORMATS
from loopjax.data.prepare import DEFAULT_HELDOUT, DEFAULT_SHARD_TOKENS


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="loopjax prepare", description=__doc__)
  p.add_argument("--input", nargs="+", default=[], help="corpus files or directories, or "
                 "datasets:NAME[:CONFIG][@SPLIT] (a Hub dataset or local folder via datasets)")
  p.add_argument("--heldout-input", nargs="+", default=[],
                 help="files or directories whose documents are all held out (test sets)")
  p.add_argument("--format", default=None, choices=FORMATS,
                 help="read every input as this format, whatever its extension")
  p.add_argument("--tokenizer", default="byte",
                 help="byte | sentencepiece:PATH.model | hf:PATH/tokenizer.json | hf:HUB_ID")
  p.add_argument("--out", required=True, help="output directory or gs:// URL")
  p.add_argument("--stage-dir", default="",
                 help="--out gs://: local folder the shards are written to before the upload "
                      "(default: ~/.cache/loopjax/prepare/<hash of the URL>, removed after)")
  p.add_argument("--text-field", default="text", help="JSONL field / Parquet, Arrow column")
  p.add_argument("--txt-split", default="paragraph", choices=("paragraph", "line"),
                 help=".txt documents: blank-line separated paragraphs or single lines")
  p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                 help="tokenizer processes (default: one per core but one)")
  p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                 help="tokens per shard (about)")
  p.add_argument("--heldout", type=float, default=DEFAULT_HELDOUT,
                 help="fraction of documents held out (by a hash of their text)")
  p.add_argument("--stats", action="store_true", help="print counts of an existing --out")
  return p


def main(argv) -> int:
  """`loopjax prepare`; argv excludes the command name."""
  a = build_parser().parse_args(argv)
  from loopjax import folders  # the tokenizers and writers: only when preparing
  from loopjax.data import shards
  from loopjax.data.prepare import prepare
  if a.stats:
    print(shards.stats(a.out))
    return 0
  folders.claim(a.out, "prepared", flag="--out")  # a run, export or study stays untouched
  m = prepare(a.input, a.tokenizer, a.out, text_field=a.text_field, txt_split=a.txt_split,
              input_format=a.format, heldout_inputs=a.heldout_input, num_workers=a.workers,
              shard_tokens=a.shard_tokens, heldout=a.heldout,
              command=shlex.join(["loopjax", "prepare", *argv]), stage_dir=a.stage_dir)
  s = m["splits"]
  print(f"prepared {a.out}: train {s['train']['docs']:,} docs / {s['train']['tokens']:,} "
        f"tokens, heldout {s['heldout']['docs']:,} docs / {s['heldout']['tokens']:,} tokens")
  return 0


if __name__ == "__main__":  # the `loopjax` command's error handling: one line, exit 2
  from loopjax.cli.main import main as loopjax_main
  sys.exit(loopjax_main(["prepare", *sys.argv[1:]]))
