"""`loopjax analyze attention`: attention among masked positions vs loops, written to
WORKDIR/eval/attention.json and WORKDIR/plots (an export folder: EXPORT.outputs/)."""

from __future__ import annotations

import argparse

from loopjax.cli.args import add_output_dir, add_weights, check_counts


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="loopjax analyze", description=__doc__)
  p.add_argument("what", choices=["attention"], help="the analysis (attention)")
  p.add_argument("--workdir", required=True, help="a run's workdir or an exported folder")
  p.add_argument("--loops", default="", help="comma list of S, 0 or max = S_max (default: powers "
                 "of two below S_max, S_max and 2*S_max)")
  p.add_argument("--examples", type=int, default=16, help="held-out rows analysed")
  p.add_argument("--time-points", type=int, default=4, help="noise levels per row")
  add_weights(p)
  add_output_dir(p)
  return p


def main(argv) -> int:
  a = build_parser().parse_args(argv)
  check_counts(("--examples", a.examples, 1), ("--time-points", a.time_points, 1))
  from loopjax.evaluate.attention import analyze_attention  # jax and the model: only when run
  _, path, plots = analyze_attention(a.workdir, loops=a.loops, examples=a.examples,
                                     time_points=a.time_points, params=a.params, step=a.step,
                                     out=a.output_dir)
  print(f"wrote {path}, {', '.join(plots)}")
  return 0
