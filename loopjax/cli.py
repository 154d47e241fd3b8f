"""The `loopjax` command.

  loopjax train --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.a.b=VALUE ...]
  loopjax flops --config A [--config.a.b=VALUE ...] [--match B [--match-config.a.b=VALUE ...]
                [--same-overrides]] [--json]
  loopjax spm-train --input FILE [FILE ...] --prefix OUT --vocab-size N
  loopjax prepare --input PATH [PATH ...] --tokenizer SPEC --out DIR [--text-field F] [--stats]
  loopjax sample --workdir DIR [--loops N|adaptive:TAU] [--steps T] [--prompt TEXT] ...
  loopjax eval --workdir DIR [--loops 1,2,4,8,12,24] [--steps 0,8] [--gsm8k F] [--corpus F] ...
  loopjax study --workdir DIR [--preset cpu|gpu|tiny]
  loopjax analyze attention --workdir DIR [--loops 1,2,4,...] [--examples N]
  loopjax memory --config A [--mesh data=..,fsdp=..,tensor=..] [--devices N | --topology v5e:2x4]
  loopjax export --workdir DIR --out OUT [--params ema|raw] [--dtype float32|bfloat16] [--step N]

Each subcommand imports only what it needs, so `loopjax --help` is instant. Expected failures
(bad config or arguments, missing or unreadable files: ValueError, OSError, UserError) print one
line `loopjax CMD: error: ...` and exit 2; `LOOPJAX_DEBUG=1` re-raises them with the traceback.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

USAGE = __doc__.split("\n\n")[1]


def _train(argv) -> int:
  import argparse

  from loopjax.train.config_load import load_config, split_config_args

  spec, overrides, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog="loopjax train")
  p.add_argument("--workdir", required=True)
  p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  args = p.parse_args(rest)
  if spec is None:
    p.error("--config experiments/NAME.py[:VARIANT] is required")
  from loopjax import storage
  storage.check_client(args.workdir)  # a gs:// workdir without its client: named up front
  config = load_config(spec, overrides)  # overrides first, then the variant's derived values
  from loopjax.parallel import distributed
  distributed.maybe_initialize(args.coordinator, args.num_processes, args.process_id)
  from loopjax.train.loop import train
  from loopjax.evaluate.final import report_task_accuracy

  with distributed.session("train"):
    out = train(config, args.workdir)
    if not out["metrics"].get("stopped_by_signal"):
      report_task_accuracy(config, out, args.workdir)
  return 0


def _spm_train(argv) -> int:
  import argparse

  from loopjax.data import train_sentencepiece
  p = argparse.ArgumentParser(prog="loopjax spm-train",
                              description="train a SentencePiece model on local text files")
  p.add_argument("--input", nargs="+", required=True)
  p.add_argument("--prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
  p.add_argument("--vocab-size", type=int, default=8000)
  args = p.parse_args(argv)
  path = train_sentencepiece(args.input, args.prefix, args.vocab_size)
  print(json.dumps({"model": str(path)}))
  return 0


# Subcommands implemented elsewhere: module and function, imported only when called.
_LAZY = {
    "flops": ("loopjax.flops_cli", "flops_main"),
    "sample": ("loopjax.evaluate.sample_cli", "sample_main"),
    "eval": ("loopjax.evaluate.sweep", "eval_main"),
    "memory": ("loopjax.train.memory", "main"),
    "export": ("loopjax.export", "export_main"),
    "analyze": ("loopjax.evaluate.attention", "analyze_main"),
    "study": ("experiments.study.cli", "main"),
    "prepare": ("loopjax.data.prepare", "prepare_main"),
}


def _lazy(module: str, function: str):
  def run(argv) -> int:
    import importlib
    return getattr(importlib.import_module(module), function)(argv)
  return run


COMMANDS = {"train": _train, "spm-train": _spm_train,
            **{name: _lazy(*target) for name, target in _LAZY.items()}}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    print("usage:\n" + USAGE, file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "gcsfs", "fsspec"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from loopjax.errors import UserError, raise_interrupted  # no heavy imports: --help stays instant
  # SIGTERM unwinds like Ctrl-C (train saves a checkpoint instead, once it is training).
  old = signal.signal(signal.SIGTERM, raise_interrupted) if _main_thread() else None
  try:
    return COMMANDS[argv[0]](argv[1:])
  except (ValueError, OSError, UserError) as e:
    if os.environ.get("LOOPJAX_DEBUG", "") not in ("", "0"):
      raise
    print(f"loopjax {argv[0]}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM: one line, 128 + the signal
    print(f"loopjax {argv[0]}: {e or 'interrupted'}", file=sys.stderr)
    return getattr(e, "exit_code", 130)
  finally:
    if old is not None:
      signal.signal(signal.SIGTERM, old)


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
  sys.exit(main())
