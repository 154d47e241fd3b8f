"""`loopjax eval`: the loop-scaling sweep of a trained run or an export (held-out NELBO, built-in
tasks, GSM8K, zero-shot perplexity, generative perplexity, lm-eval tasks), written to
WORKDIR/eval and WORKDIR/plots (an export folder: EXPORT.outputs/; --output-dir DIR: DIR/)."""

from __future__ import annotations

import argparse
import json
import os

from loopjax.cli.args import (LOOPS_HELP, add_output_dir, add_renamed, add_weights,
                              check_counts)


def _ints(s: str) -> list[int]:
  try:
    return [int(v) for v in s.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--denoising-steps {s!r}: want a comma list of integers (0: the "
                     "default)") from None


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="loopjax eval", description=__doc__)
  p.add_argument("--workdir", required=True, help="a training workdir or a `loopjax export` folder")
  p.add_argument("--loops", action="append", default=None,
                 help=f"comma list, each {LOOPS_HELP} (repeatable); default: powers of two below "
                 "S_max, S_max and 2*S_max (1,2,4,8,12,24 for S_max = 12)")
  p.add_argument("--denoising-steps", default="0", metavar="T[,T...]",
                 help="comma list of denoising steps (0: one token per step for built-in tasks "
                 "and --gen-ppl, answer length for GSM8K)")
  add_renamed(p, "--steps", "--denoising-steps")
  p.add_argument("--sampler", default=None, choices=("confidence", "ancestral"),
                 help="default confidence for tasks and GSM8K, ancestral for --gen-ppl")
  p.add_argument("--temperature", type=float, default=None,
                 help="sampling temperature (default: the sampler's own)")
  p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
  p.add_argument("--block-len", type=int, default=0, help="semi-autoregressive block size")
  p.add_argument("--examples", type=int, default=128, help="built-in task examples")
  p.add_argument("--batch-size", type=int, default=64, help="rows per model call")
  p.add_argument("--nelbo-batches", type=int, default=2, help="held-out batches of the NELBO")
  p.add_argument("--time-points", type=int, default=8,
                 help="diffusion times per row of the NELBO estimate")
  p.add_argument("--no-nelbo", action="store_true", help="skip the held-out NELBO")
  p.add_argument("--no-tasks", action="store_true", help="skip the built-in task accuracy")
  p.add_argument("--gsm8k", default=None, help="GSM8K-format JSONL file")
  p.add_argument("--gsm8k-limit", type=int, default=0, help="GSM8K examples scored (0: all)")
  p.add_argument("--answer-len", type=int, default=None, help="GSM8K answer positions "
                 "(default: the run's data.answer_len if it was fine-tuned on prompt_answer "
                 "data, else 64)")
  p.add_argument("--corpus", action="append", default=[], help="local corpus for zero-shot "
                 "perplexity, NAME=FILE with NAME one of ptb, wikitext, lm1b, lambada, ag_news, "
                 "pubmed, arxiv (its detokenizer) or a bare FILE (.txt/.jsonl/.parquet, "
                 "repeatable)")
  p.add_argument("--corpus-rows", type=int, default=0, help="rows scored per corpus (0: all)")
  p.add_argument("--corpus-layout", default="auto",
                 choices=("auto", "document", "concat", "mdlm"),
                 help="rows of a corpus: auto follows the run's data config")
  p.add_argument("--gen-ppl", default=None, metavar="JUDGE", help="generative perplexity "
                 "of samples under this Hugging Face causal LM (a local folder or a Hub id "
                 "such as gpt2-large, cache first)")
  p.add_argument("--samples", type=int, default=64, metavar="N",
                 help="--gen-ppl: rows generated per S x denoising steps")
  p.add_argument("--prompt", default=None, help="--gen-ppl: continue this text")
  p.add_argument("--judge-device", default="cpu", help="--gen-ppl: torch device of the judge")
  p.add_argument("--judge-batch-size", type=int, default=8, help="--gen-ppl: rows per judge call")
  add_weights(p)
  p.add_argument("--seed", type=int, default=0, help="sampling and time-sampling seed")
  add_output_dir(p)
  g = p.add_argument_group("lm-evaluation-harness (pip install -e '.[eval]')")
  g.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma list of lm-eval tasks, "
                 "run with the 'loopjax' model at every --loops policy (eval/lm_eval.json)")
  g.add_argument("--lm-eval-args", default=None, metavar="K=V,...", help="num_fewshot, limit, "
                 "bootstrap_iters, ... for lm-eval; other keys are model_args (mc_samples, "
                 "max_gen_toks, ...)")
  g.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
  g.add_argument("--lm-eval-data", action="append", default=[], metavar="NAME=FILE",
                 help="local JSONL of a shipped task (repeatable): gsm8k=FILE for "
                 "loopjax_gsm8k_jsonl (gsm8k_train=FILE: its few-shot examples, default the same "
                 "file), mc=FILE for loopjax_mc_jsonl")
  return p


def evaluations(a) -> dict:
  """{registered evaluation: its options} that the flags ask for."""
  asked = {
      "likelihood": not a.no_nelbo and dict(batches=a.nelbo_batches, time_points=a.time_points),
      "tasks": not a.no_tasks and dict(examples=a.examples),
      "gsm8k": a.gsm8k and dict(file=a.gsm8k, limit=a.gsm8k_limit, answer_len=a.answer_len),
      "zero_shot": a.corpus and dict(corpus=a.corpus, rows=a.corpus_rows,
                                     layout=a.corpus_layout, time_points=a.time_points),
      "gen_ppl": a.gen_ppl and dict(judge=a.gen_ppl, samples=a.samples, prompt=a.prompt,
                                    method=a.sampler or "ancestral", device=a.judge_device,
                                    batch_size=a.judge_batch_size),
      "lm_eval": a.lm_eval and dict(tasks=a.lm_eval, args=a.lm_eval_args,
                                    include_path=a.include_path, data=a.lm_eval_data,
                                    time_grid=a.time_points),
  }
  return {name: options for name, options in asked.items() if options}


def main(argv) -> int:
  a = build_parser().parse_args(argv)
  check_counts(("--examples", a.examples, 1), ("--batch-size", a.batch_size, 1),
               ("--nelbo-batches", a.nelbo_batches, 1), ("--time-points", a.time_points, 1),
               ("--samples", a.samples, 1), ("--judge-batch-size", a.judge_batch_size, 1),
               ("--gsm8k-limit", a.gsm8k_limit, 0), ("--corpus-rows", a.corpus_rows, 0))
  steps = _ints(a.denoising_steps)
  if any(n < 0 for n in steps):
    raise ValueError(f"--denoising-steps {a.denoising_steps}: must be >= 0 (0: the default)")
  from loopjax.evaluate.outputs import output_dir  # jax and the model: only when evaluating
  from loopjax.evaluate.sweep import run_eval
  kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, block_len=a.block_len)
  summary = run_eval(
      a.workdir, evaluations(a), loops=a.loops, steps=steps,
      method=a.sampler or "confidence", batch_size=a.batch_size, params=a.params, step=a.step,
      seed=a.seed, sampler_kw=kw, command="loopjax eval " + " ".join(argv), out=a.output_dir)
  print(json.dumps({"eval": os.path.join(output_dir(a.workdir, a.output_dir), "eval"),
                    "plots": summary["plots"],
                    "seconds": round(summary["seconds"], 1)}))
  return 0
