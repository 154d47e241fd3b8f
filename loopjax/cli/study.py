"""`loopjax study`: LoopMDM vs MDM on text, the paper's claims checked on runs trained here
(the study itself lives beside the experiment configs, in `experiments.study`)."""

from __future__ import annotations

import argparse

from experiments.study.presets import PRESETS


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="loopjax study",
      description="LoopMDM vs MDM on text: held-out NELBO at equal training FLOPs, the FLOP "
                  "multiplier against budget, inference loops, adaptive loops and attention")
  p.add_argument("--workdir", required=True, help="runs, caches, study.json, study.md, plots/ "
                 "(created, or resumed: finished runs and scores are reused)")
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                 help="cpu: under an hour on 2 CPU cores (default); gpu: ~100x the training "
                      "compute, one H100; tiny: seconds, for tests")
  p.add_argument("--corpus", default=None,
                 help="folder of fortune files (default for cpu/gpu: "
                      f"{PRESETS['cpu']['corpus']})")
  return p


def main(argv) -> int:
  args = build_parser().parse_args(argv)
  from loopjax import folders
  from experiments.study import run
  folders.claim(args.workdir, "study")
  run(args.workdir, preset=args.preset, corpus=args.corpus)
  return 0
