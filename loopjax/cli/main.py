"""The `loopjax` command.

  loopjax train --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.SECTION.KEY=VALUE ...]
  loopjax flops --config A [--config.a.b=VALUE ...] [--match B [--match-config.a.b=VALUE ...]
                [--same-overrides]] [--json]
  loopjax memory --config A [--mesh data=..,fsdp=..,tensor=..] [--devices N | --topology v5e:2x4]
  loopjax spm-train --input FILE [FILE ...] --prefix OUT --vocab-size N
  loopjax prepare --input PATH|datasets:NAME[:CONFIG][@SPLIT] ... --tokenizer SPEC --out DIR
                  [--text-field F] [--stats]
  loopjax sample --workdir DIR [--step N|best] [--loops N|max|adaptive:TAU] [--denoising-steps T]
                 [--samples N] [--prompt TEXT] ...
  loopjax eval --workdir DIR [--step N|best] [--loops 1,2,4,8,12,24] [--denoising-steps 0,8]
               [--gsm8k F] [--corpus F] [--gen-ppl JUDGE] [--lm-eval TASKS] ...
  loopjax analyze attention --workdir DIR [--loops 1,2,4,...] [--examples N]
  loopjax export --workdir DIR --out OUT [--step N|best] [--params ema|raw] [--dtype D]
  loopjax study --workdir DIR [--preset cpu|gpu|tiny]

`loopjax SUB --help` lists every flag of a subcommand. Each subcommand imports only what it
needs, so `loopjax --help` is instant. Expected failures (bad config or arguments, missing or
unreadable files: ValueError, OSError, UserError) print one line `loopjax CMD: error: ...` and
exit 2; `LOOPJAX_DEBUG=1` re-raises them with the traceback. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

from loopjax.cli import platforms

USAGE = __doc__.split("\n\n")[1]
HELP = (f"usage:\n{USAGE}\n\n{__doc__.split(chr(10) * 2, 2)[2].strip()}\n\n"
        "  loopjax --version    the installed version")


def train_parser():
  import argparse

  from loopjax.cli.config import CONFIG_HELP, OVERRIDES_EPILOG
  p = argparse.ArgumentParser(
      prog="loopjax train", description="train a model from an experiment file; re-running the "
      "same command with the same --workdir resumes from its latest checkpoint",
      epilog=OVERRIDES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", metavar="FILE[:VARIANT]", help=CONFIG_HELP)
  p.add_argument("--workdir", required=True,
                 help="run folder (local or gs://): config.json, checkpoints/, metrics.jsonl, tb/")
  p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
  p.add_argument("--num-processes", type=int, default=None,
                 help="processes of a multi-host run (default: detected)")
  p.add_argument("--process-id", type=int, default=None,
                 help="this process's index in a multi-host run (default: detected)")
  return p


def _train(argv) -> int:
  from loopjax.cli.config import parse_config_command
  from loopjax.config.load import load_config

  spec, overrides, args = parse_config_command(train_parser(), argv)
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


def spm_train_parser():
  import argparse
  p = argparse.ArgumentParser(prog="loopjax spm-train",
                              description="train a SentencePiece model on local text files")
  p.add_argument("--input", nargs="+", required=True, help="text files, one sentence a line")
  p.add_argument("--prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
  p.add_argument("--vocab-size", type=int, default=8000, help="pieces in the vocabulary")
  return p


def _spm_train(argv) -> int:
  args = spm_train_parser().parse_args(argv)
  from loopjax.data import train_sentencepiece
  path = train_sentencepiece(args.input, args.prefix, args.vocab_size)
  print(json.dumps({"model": str(path)}))
  return 0


# Subcommands implemented elsewhere: module and function, imported only when called.
_LAZY = {
    "flops": ("loopjax.cli.flops", "flops_main"),
    "memory": ("loopjax.cli.memory", "main"),
    "prepare": ("loopjax.cli.prepare", "main"),
    "sample": ("loopjax.cli.sample", "main"),
    "eval": ("loopjax.cli.eval", "main"),
    "analyze": ("loopjax.cli.analyze", "main"),
    "export": ("loopjax.cli.export", "main"),
    "study": ("loopjax.cli.study", "main"),
}


def _lazy(module: str, function: str):
  def run(argv) -> int:
    import importlib
    return getattr(importlib.import_module(module), function)(argv)
  return run


COMMANDS = {"train": _train, "spm-train": _spm_train,
            **{name: _lazy(*target) for name, target in _LAZY.items()}}


def parsers() -> dict:
  """{command: its argparse parser}; imports every subcommand's module (for help checks)."""
  import importlib
  built = {"train": train_parser(), "spm-train": spm_train_parser()}
  for name, (module, _) in _LAZY.items():
    built[name] = importlib.import_module(module).build_parser()
  return built


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):  # asked for: stdout, success
    print(HELP)
    return 0
  if argv[0] == "--version":
    from loopjax import __version__
    print(f"loopjax {__version__}")
    return 0
  if argv[0] not in COMMANDS:
    print(f"loopjax: error: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}\n"
          f"usage:\n{USAGE}", file=sys.stderr)
    return 2
  platforms.choose()  # before anything initialises jax's backends
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
