"""What the subcommands share on the command line: one name per meaning, and the old spellings.

Across `sample`, `eval` and `analyze`:
  --loops          S, 0 / max (= S_max, the largest S of training), or a policy
                   (adaptive:TAU[:MIN[:MAX]], time:A:B, mask:A:B); `sample` runs one (default
                   S_max), `eval` and `analyze attention` sweep several (default: powers of two
                   below S_max, S_max and 2 * S_max, e.g. 1,2,4,8,12,24)
  --denoising-steps  sampler steps per row (`train.steps` is the number of training steps)
  --samples        how many rows are generated
  --output-dir     where eval/, plots/ and samples/ go (default: the workdir; beside an export
                   folder, EXPORT.outputs); `--out` is kept for the folder a command creates
                   (`export`, `prepare`)
Old spellings (`sample --num`, `--steps` for denoising steps, `--out` for --output-dir) still
work and print a one-line note naming the new one.
"""

from __future__ import annotations

import argparse
import sys

from loopjax.io.checkpoints import BEST

LOOPS_HELP = ("S (or fixed:S), 0 or max = S_max, adaptive:TAU[:MIN[:MAX]], time:A:B or mask:A:B")


def check_counts(*checks) -> None:
  """(flag, value, lowest allowed) triples: ValueError naming the first count below its bound,
  before any model is loaded."""
  for flag, value, low in checks:
    if value < low:
      raise ValueError(f"{flag} must be >= {low}, got {value}")


def _renamed(new: str):
  """An argparse action for an old spelling: stores into the new flag's dest and prints one
  line to stderr naming the new flag."""

  class Renamed(argparse._StoreAction):  # pylint: disable=protected-access
    def __call__(self, parser, namespace, values, option_string=None):
      print(f"{parser.prog}: note: {option_string} is deprecated, use {new}", file=sys.stderr)
      super().__call__(parser, namespace, values, option_string)

  return Renamed


def add_renamed(parser, old: str, new: str, **kw) -> None:
  """`old` as a deprecated spelling of the already added flag `new` (same dest and type)."""
  target = next(a for a in parser._actions if new in a.option_strings)  # pylint: disable=protected-access
  parser.add_argument(old, dest=target.dest, type=kw.pop("type", target.type),
                      default=argparse.SUPPRESS, action=_renamed(new), metavar=target.metavar,
                      help=f"deprecated spelling of {new}", **kw)


def add_output_dir(parser) -> None:
  parser.add_argument("--output-dir", default=None, metavar="DIR",
                      help="write eval/, plots/ and samples/ here (default: the workdir; beside "
                      "an export folder, EXPORT.outputs)")
  add_renamed(parser, "--out", "--output-dir")


def parse_step(value) -> int | str | None:
  """A `--step` value: a checkpoint step (int), BEST, or None (the newest readable); argparse's
  `type` (its ArgumentTypeError prints the message as the one-line error)."""
  if value is None or value == BEST:
    return value
  try:
    return int(value)
  except (TypeError, ValueError):
    raise argparse.ArgumentTypeError(
        f"--step {value!r}: want a checkpoint step (an integer) or {BEST!r} (the lowest held-out "
        "NELBO of training); omit it for the newest") from None


def add_weights(parser) -> None:
  """--params and --step: which weights of a run are read (an export holds one kind)."""
  parser.add_argument("--params", default=None, choices=("ema", "raw"),
                      help="workdir: which weights (default ema); an export holds one kind")
  parser.add_argument("--step", type=parse_step, default=None,
                      help="checkpoint step, or best (the lowest held-out NELBO of training); "
                      "default: the newest")
