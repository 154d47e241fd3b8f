"""The `loopjax` command.

  loopjax train --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.a.b=VALUE ...]
  loopjax flops --config A [--match B] [--json]
  loopjax spm-train --input FILE [FILE ...] --prefix OUT --vocab-size N
  loopjax sample --workdir DIR [--loops N|adaptive:TAU] [--steps T] [--prompt TEXT] ...
  loopjax eval --workdir DIR [--loops 1,2,4,8,12,24] [--steps 0,8] [--gsm8k F] [--corpus F] ...
  loopjax study --workdir DIR [--task sudoku|arithmetic] [--scale small|tiny]
  loopjax analyze attention --workdir DIR [--loops 1,2,4,...] [--examples N]
  loopjax memory --config A [--mesh data=..,fsdp=..,tensor=..] [--devices N | --topology v5e:2x4]
  loopjax export --workdir DIR --out OUT [--params ema|raw] [--dtype float32|bfloat16] [--step N]

Each subcommand imports only what it needs, so `loopjax --help` is instant.
"""

from __future__ import annotations

import json
import logging
import sys

USAGE = __doc__.split("\n\n")[1]


def load_config(spec: str, overrides=()):
  """Loads `path.py[:variant]` and applies `--config.a.b=value` overrides (unknown key: error)."""
  import os

  from absl import flags
  from ml_collections import config_flags

  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (expected path.py[:variant])")
  fv = flags.FlagValues()
  argv = ["loopjax", f"--config={spec}", *overrides]
  # ml_collections defines one override flag per `--config.x` it finds in sys_argv.
  config_flags.DEFINE_config_file("config", None, "experiment file", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise ValueError(f"bad config or override: {e}") from None
  except (KeyError, AttributeError) as e:
    raise ValueError(f"unknown config key in overrides {list(overrides)}: {e}") from None
  return fv.config


def _split_config_args(argv):
  """Separates --config / --config.x=v arguments from the subcommand's own."""
  spec, overrides, rest = None, [], []
  it = iter(argv)
  for a in it:
    if a == "--config":
      spec = next(it, None)
    elif a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a.startswith("--config."):
      if "=" not in a:
        a = f"{a}={next(it, '')}"
      overrides.append(a)
    else:
      rest.append(a)
  return spec, overrides, rest


def _train(argv) -> int:
  import argparse

  spec, overrides, rest = _split_config_args(argv)
  p = argparse.ArgumentParser(prog="loopjax train")
  p.add_argument("--workdir", required=True)
  p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  args = p.parse_args(rest)
  if spec is None:
    p.error("--config experiments/NAME.py[:VARIANT] is required")
  config = load_config(spec, overrides)
  from loopjax.parallel import distributed
  distributed.maybe_initialize(args.coordinator, args.num_processes, args.process_id)
  from loopjax.train.loop import train
  from loopjax.train.finish import report_task_accuracy

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
    "study": ("loopjax.evaluate.study", "study_main"),
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
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    return COMMANDS[argv[0]](argv[1:])
  except (ValueError, FileNotFoundError) as e:
    print(f"loopjax {argv[0]}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
