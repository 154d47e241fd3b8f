"""`loopjax sample`: generate from a trained run or an export, with any loop policy and sampler.

Prints the decoded samples and one JSON line (loops executed, model calls, FLOPs, seconds) and
writes WORKDIR/samples/sample_<time>.json (an export folder: EXPORT.outputs/samples/;
--output-dir DIR: DIR/samples/).
"""

from __future__ import annotations

import argparse
import json

from loopjax.cli.args import (LOOPS_HELP, add_output_dir, add_renamed, add_weights,
                              check_counts)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="loopjax sample", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a training workdir or a `loopjax export` folder")
  p.add_argument("--loops", default="max", help=f"{LOOPS_HELP}; default max (S_max)")
  p.add_argument("--denoising-steps", type=int, default=0, metavar="T",
                 help="denoising steps (0, the default: one per masked position)")
  add_renamed(p, "--steps", "--denoising-steps")
  p.add_argument("--sampler", default="ancestral", choices=("ancestral", "confidence"),
                 help="ancestral (MDLM's) or confidence (unmask the most confident first)")
  p.add_argument("--samples", type=int, default=4, metavar="N", help="rows generated")
  add_renamed(p, "--num", "--samples")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--prompt", default=None, help="fixed prefix; the rest of the row is generated")
  g.add_argument("--template", default=None, help="infilling: every --mask-char is one position "
                 "to fill, the rest never changes")
  g.add_argument("--heldout", action="store_true", help="the run's held-out task examples (e.g. "
                 "Sudoku puzzles) as prompts, scored")
  p.add_argument("--mask-char", default="?", help="the character of --template that is filled")
  p.add_argument("--length", type=int, default=0, help="row length (default data.seq_len)")
  p.add_argument("--temperature", type=float, default=None,
                 help="sampling temperature (default: the sampler's own)")
  p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
  p.add_argument("--block-len", type=int, default=0,
                 help="semi-autoregressive block size (0: the whole row at once)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  add_weights(p)
  add_output_dir(p)
  return p


def main(argv) -> int:
  a = build_parser().parse_args(argv)
  check_counts(("--samples", a.samples, 1), ("--denoising-steps", a.denoising_steps, 0),
               ("--length", a.length, 0), ("--block-len", a.block_len, 0),
               ("--top-k", a.top_k, 0))
  from loopjax.evaluate.sampling import run_sample  # jax and the model: only when sampling
  _, report = run_sample(
      a.workdir, loops=a.loops, steps=a.denoising_steps, sampler=a.sampler, samples=a.samples,
      prompt=a.prompt, template=a.template, heldout=a.heldout, mask_char=a.mask_char,
      length=a.length, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
      block_len=a.block_len, seed=a.seed, params=a.params, step=a.step, out=a.output_dir)
  print(json.dumps(report))
  return 0
