"""`loopjax study`: the paper's claims checked on small runs trained here (a study folder)."""

from __future__ import annotations

import argparse

from loopjax import folders
from loopjax.evaluate.study import PRESETS, run_study


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="loopjax study", description=__doc__)
  p.add_argument("--workdir", required=True, help="the study folder (created, or resumed)")
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                 help="cpu: ~45 min on 2 CPU cores (default); gpu: ~100x the compute, ~10 min "
                      "on one H100/H200; tiny: seconds, for tests")
  return p


def main(argv) -> int:
  args = build_parser().parse_args(argv)
  folders.claim(args.workdir, "study")
  run_study(args.workdir, preset=args.preset)
  return 0
