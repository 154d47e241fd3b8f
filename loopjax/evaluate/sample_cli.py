"""`loopjax sample`: generate from a trained run, with any loop policy and sampler.

  loopjax sample --workdir DIR [--loops N|adaptive:TAU[:MIN[:MAX]]|time:A:B|mask:A:B]
                 [--steps T] [--sampler ancestral|confidence] [--num N]
                 [--prompt TEXT | --template TEXT [--mask-char ?] | --heldout]
                 [--length L] [--temperature X] [--top-k K] [--top-p P] [--block-len B]

--prompt: the text is a fixed prefix, the rest of the row (up to --length) is generated.
--template: infilling; every --mask-char is one position to fill, the rest never changes.
--heldout: the run's held-out task examples (e.g. Sudoku puzzles) as prompts, scored.
--loops: 0 or max = S_max, as in every command (loopjax/evaluate/cli_args.py).
Prints the decoded samples and one JSON line (loops executed, model calls, FLOPs, seconds) and
writes WORKDIR/samples/sample_<time>.json (an export folder: EXPORT.outputs/samples/; --out DIR:
DIR/samples/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from loopjax.data import make_eval_batches, tokenizer_for
from loopjax.evaluate.cli_args import (check_counts, claim_output_dir, output_dir,
                                      parse_loops_arg, warn_loop_cost)
from loopjax.evaluate.tasks import score
from loopjax.inference.denoiser import resolve_policy
from loopjax.inference.generate import default_steps, generate, prompt_rows
from loopjax.io.checkpoints import parse_step
from loopjax.io.load import load_model_dir


def _show(source: str, text: str) -> str:
  if source == "sudoku" and len(text) == 81:
    return "\n".join(text[r * 9:(r + 1) * 9] for r in range(9))
  return text


def sample_main(argv) -> int:
  p = argparse.ArgumentParser(prog="loopjax sample", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--loops", default="max", help="S (or fixed:S), adaptive:TAU[:MIN[:MAX]], "
                 "time:A:B, mask:A:B (0 or max = S_max, the default)")
  p.add_argument("--steps", type=int, default=0, help="denoising steps (0: one per position)")
  p.add_argument("--sampler", default="ancestral", choices=("ancestral", "confidence"))
  p.add_argument("--num", type=int, default=4, help="samples (rows)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--prompt", default=None)
  g.add_argument("--template", default=None)
  g.add_argument("--heldout", action="store_true")
  p.add_argument("--mask-char", default="?")
  p.add_argument("--length", type=int, default=0, help="row length (default data.seq_len)")
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--block-len", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--params", default=None, choices=("ema", "raw"),
                 help="workdir: which weights (default ema); an export holds one kind")
  p.add_argument("--step", type=parse_step, default=None, help="checkpoint step, or best (the lowest held-out NELBO of training); default: the newest")
  p.add_argument("--out", default=None, help="write samples/ here (default: the workdir; beside "
                 "an export folder, EXPORT.outputs)")
  a = p.parse_args(argv)
  check_counts(("--num", a.num, 1), ("--steps", a.steps, 0), ("--length", a.length, 0),
               ("--block-len", a.block_len, 0), ("--top-k", a.top_k, 0))
  claim_output_dir(a.workdir, a.out)

  # A training workdir or a `loopjax export` folder.
  config, model, params = load_model_dir(a.workdir, params=a.params, step=a.step)
  ckpt = config.source.get("step") or 0
  cfg, tok = model.cfg, tokenizer_for(config.data)
  policy = resolve_policy(cfg, parse_loops_arg(a.loops, cfg.max_loops))
  length = a.length or config.data.seq_len
  batch = None
  if a.heldout:
    batch = make_eval_batches(config.data, batch_size=a.num, num_batches=1,
                              seed=int(config.get("train", {}).get("seed", 0)) + 1)[0]
    x = np.where(batch["loss_mask"], cfg.mask_id, batch["tokens"])
  else:
    x = prompt_rows(tok, cfg.mask_id, a.num, length, prompt=a.prompt, template=a.template,
                    mask_char=a.mask_char, length_name="--length")
  steps = a.steps or default_steps(x, cfg.mask_id)
  warn_loop_cost(cfg, policy.largest, length=x.shape[1], calls=steps, samples=a.num)
  gen = generate(model, params, config, tok, x, loops=policy, steps=steps, sampler=a.sampler,
                 block_len=a.block_len, temperature=a.temperature, top_k=a.top_k,
                 top_p=a.top_p, seed=a.seed,
                 segment_ids_BxL=None if batch is None else batch["segment_ids"])
  tokens, texts = gen.tokens, gen.texts
  for i, text in enumerate(texts):
    print(f"--- sample {i}\n{_show(config.data.source, text)}")
  report = {"checkpoint_step": int(ckpt), **gen.stats}
  if batch is not None and config.data.source in ("sudoku", "arithmetic"):
    report.update(score(config.data.source, tokens, batch["tokens"], batch["fixed"],
                        batch["loss_mask"]))
  given = x != cfg.mask_id
  report["given_kept"] = bool(np.array_equal(tokens[given], x[given]))
  report["masks_left"] = int((tokens == cfg.mask_id).sum())
  samples_dir = os.path.join(output_dir(a.workdir, a.out), "samples")
  os.makedirs(samples_dir, exist_ok=True)
  path = os.path.join(samples_dir, f"sample_{time.strftime('%Y%m%d_%H%M%S')}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**report, "samples": texts}, f, indent=2)
  print(json.dumps({**report, "file": path}))
  return 0


if __name__ == "__main__":
  sys.exit(sample_main(sys.argv[1:]))
