"""`python -m loopjax.cli.xla_flags GENERATION [--env]`: the XLA / libtpu flag set of an
accelerator generation, for launchers (loopjax/parallel/xla_flags.py holds the table).

Imports neither jax nor anything that does: launchers run it on hosts without jax.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from loopjax.parallel.xla_flags import GENERATIONS, env_var, flag_string


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m loopjax.cli.xla_flags", description=__doc__)
  p.add_argument("generation", help=f"{', '.join(GENERATIONS)}, a topology or accelerator type")
  p.add_argument("--env", action="store_true", help="print VAR='flags' for the shell")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    text = flag_string(args.generation)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{env_var(args.generation)}={shlex.quote(text)}" if args.env else text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
