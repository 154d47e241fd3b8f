"""`loopjax eval`: the loop-scaling sweep of a trained run, written to WORKDIR/eval and plots
(an export folder: EXPORT.outputs/eval and plots; `--out DIR`: DIR/eval and DIR/plots).

For every loop policy (fixed S, including S > S_max; adaptive; schedules):
  likelihood.json  held-out NELBO, bits/token, perplexity bound, forward FLOPs per sequence
  tasks.json       built-in task accuracy (Sudoku cells/boards, arithmetic exact match) for
                   every number of denoising steps, with executed loops, model calls, inference
                   FLOPs per sample and sampling time
  gsm8k.json       GSM8K-format JSONL exact match (--gsm8k FILE)
  zero_shot.json   perplexity bound on local corpora, a table corpus x S (--corpus NAME=FILE)
  gen_ppl.json     generative perplexity under a local judge LM, unigram entropy, per S x
                   steps (--gen-ppl JUDGE_DIR; samples in gen_ppl_samples.jsonl)
  lm_eval.json     lm-evaluation-harness task results (--lm-eval TASKS; the `.[eval]` extra)
  summary.json     all of the above plus the checkpoint, the command and the machine
each row list also as NAME.md and NAME.tex tables (loopjax.evaluate.tables), and plots in
WORKDIR/plots (PNG, SVG, PDF): quality vs S and quality vs executed compute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax

from loopjax.checkpoints import parse_step
from loopjax.data import make_eval_batches, tokenizer_for
from loopjax.diffusion import make_schedule
from loopjax.diffusion.samplers import sampler_endpoint
from loopjax.evaluate import plots, tables
from loopjax.evaluate.cli_args import (check_counts, claim_output_dir, output_dir,
                                      parse_loops_arg, warn_loop_cost)
from loopjax.evaluate.denoiser import resolve_policy
from loopjax.loops import split_specs
from loopjax.evaluate.gsm8k import gsm8k_accuracy, read_gsm8k
from loopjax.evaluate.gen_ppl import check_judge, gen_ppl_sweep, load_judge
from loopjax.evaluate.harness import check_lm_eval, parse_task_data, run_lm_eval
from loopjax.evaluate.likelihood import heldout_nelbo
from loopjax.evaluate.tasks import heldout_batches, task_accuracy
from loopjax.evaluate.zero_shot import parse_corpus, zero_shot_eval
from loopjax.weights import load_model_dir

DEFAULT_LOOPS = "1,2,4,8,12,24"


def machine() -> str:
  d = jax.devices()[0]
  return (f"{d.platform} {getattr(d, 'device_kind', '')} x{jax.device_count()}, "
          f"{os.cpu_count()} host cores, {platform.machine()}, jax {jax.__version__}")


def _write(workdir: str, name: str, obj) -> str:
  path = os.path.join(workdir, "eval", name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  if isinstance(obj, dict) and obj.get("rows"):  # NAME.md / NAME.tex beside NAME.json
    tables.write_eval_tables(path, obj["rows"])
  return path


def _log(msg: str) -> None:
  print(msg, flush=True)


def run_eval(workdir: str, *, loops=(DEFAULT_LOOPS,), steps=(0,), method: str = "confidence",
             examples: int = 128, batch_size: int = 64, nelbo_batches: int = 2,
             time_points: int = 8, do_nelbo: bool = True, do_tasks: bool = True,
             gsm8k: str | None = None, gsm8k_limit: int = 0, answer_len: int | None = None,
             corpus=(), corpus_rows: int = 0, corpus_layout: str = "auto",
             gen_ppl: dict | None = None, params: str | None = None, step: int | None = None,
             seed: int = 0, sampler_kw: dict | None = None, command: str = "",
             out: str | None = None, lm_eval: dict | None = None) -> dict:
  """Runs the sweep and writes eval/*.json and plots/*.png under `output_dir(workdir, out)`;
  returns the summary dict.

  gen_ppl: {"judge": DIR, "samples", "method", "prompt", "device", "batch_size"} (gen_ppl.py).
  lm_eval: {"tasks", "args", "include_path", "data"} (harness.py; data: --lm-eval-data).
  """
  t_start = time.time()
  # Every file and folder named is checked before the model loads and anything compiles.
  workdir_out = claim_output_dir(workdir, out)
  exs = read_gsm8k(gsm8k, gsm8k_limit) if gsm8k else None
  for c in corpus:
    parse_corpus(c)
  if gen_ppl:
    check_judge(gen_ppl["judge"])
  if lm_eval:
    lm_eval = {**lm_eval, "data": parse_task_data(lm_eval.get("data"))}
    check_lm_eval(lm_eval["tasks"], lm_eval.get("include_path"), lm_eval["data"])
  # A training workdir or a `loopjax export` folder.
  config, model, weights = load_model_dir(workdir, step=step, params=params)
  ckpt = config.source.get("step") or 0
  cfg = model.cfg
  specs = [parse_loops_arg(s, cfg.max_loops) for s in split_specs(loops)]  # LoopPolicy, once
  for s in specs:  # fail (or warn of the cost) before any work on a policy this model cannot run
    warn_loop_cost(cfg, resolve_policy(cfg, s).largest, length=config.data.seq_len,
                   calls=max(steps, default=0) or config.data.seq_len, samples=examples)
  judge = (load_judge(gen_ppl["judge"], device=gen_ppl.get("device", "cpu"))
           if gen_ppl else None)
  source = config.data.source
  sampler_kw = dict(sampler_kw or {})
  summary = {"workdir": os.path.abspath(workdir), "checkpoint_step": int(ckpt),
             "params": config.source.get("params"), "s_max": cfg.max_loops, "source": source,
             "loops": [p.label for p in specs], "machine": machine(), "command": command}
  eval_seed = int(config.get("train", {}).get("seed", 0)) + 1
  plot_paths = []

  if do_nelbo:
    schedule = make_schedule(config.diffusion)
    batches = make_eval_batches(config.data, batch_size=batch_size, num_batches=nelbo_batches,
                                seed=eval_seed)
    rows = []
    for s in specs:
      row = heldout_nelbo(model, weights, batches, schedule=schedule, loops=s,
                          time_points=time_points, seed=seed)
      rows.append(row)
      _log(f"nelbo  S={s:<14} bits/token {row['bits_per_token']:.4f}  "
           f"ppl<= {row['ppl_bound']:.3f}")
    summary["likelihood"] = rows
    _write(workdir_out, "likelihood.json", {**summary, "rows": rows})
    plot_paths.append(plots.plot_quality_vs_loops(
        rows, metric="bits_per_token", group="none", path=os.path.join(
            workdir_out, "plots", "eval_bits_vs_loops.png"), title="held-out NELBO vs loops",
        s_max=cfg.max_loops))

  if do_tasks and source in ("sudoku", "arithmetic"):
    batches = heldout_batches(config.data, examples, seed=eval_seed, batch_size=batch_size)
    rows = []
    for n_steps in steps:
      for s in specs:
        row = task_accuracy(model, weights, batches, source=source, loops=s, steps=n_steps,
                            method=method, seed=seed, **sampler_kw)
        rows.append(row)
        accs = "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                         if k.endswith(("accuracy", "exact_match")))
        _log(f"task   S={s:<14} steps {row['steps']:<3} {accs}  loops {row['loops_mean']:.2f}"
             f" (executed {row['executed_loops_mean']:.2f})  {row['seconds']:.2f}s")
    summary["tasks"] = rows
    _write(workdir_out, "tasks.json", {**summary, "rows": rows})
    plot_paths += plot_task_rows(rows, workdir_out, s_max=cfg.max_loops)

  if gsm8k:
    tok = tokenizer_for(config.data)
    # A model fine-tuned on prompt_answer data is asked in its training layout.
    tuned = config.data.get("source") == "prompt_answer"
    template = config.data.get("prompt_template") if tuned else None
    answer_len = answer_len or (int(config.data.get("answer_len")) if tuned else 64)
    rows = []
    for n_steps in steps:
      for s in specs:
        row = gsm8k_accuracy(model, weights, tok, exs, seq_len=config.data.seq_len, loops=s,
                             answer_len=answer_len, steps=n_steps or answer_len, method=method,
                             batch_size=min(batch_size, len(exs)), seed=seed,
                             **({"template": template} if template else {}), **sampler_kw)
        rows.append(row)
        _log(f"gsm8k  S={s:<14} exact match {row['exact_match']:.4f}")
    summary["gsm8k"] = rows
    _write(workdir_out, "gsm8k.json", {**summary, "file": gsm8k, "rows": rows})
    plot_paths.append(plots.plot_quality_vs_compute(
        rows, metric="exact_match",
        path=os.path.join(workdir_out, "plots", "eval_gsm8k_vs_flops.png"), s_max=cfg.max_loops))

  if corpus:
    zs = zero_shot_eval(model, weights, config, corpus, specs,
                        schedule=make_schedule(config.diffusion),
                        tokenizer=tokenizer_for(config.data), batch_size=batch_size,
                        time_points=time_points, max_rows=corpus_rows, layout=corpus_layout,
                        seed=seed, log=_log)
    summary["zero_shot"] = zs["rows"]
    _write(workdir_out, "zero_shot.json", {**summary, **zs})
    plot_paths.append(plots.plot_quality_vs_loops(
        zs["rows"], metric="ppl_bound", group="corpus", path=os.path.join(
            workdir_out, "plots", "eval_zero_shot_ppl_vs_loops.png"), s_max=cfg.max_loops))

  if judge is not None:
    g = dict(gen_ppl)
    summary["gen_ppl"] = gen_ppl_sweep(
        model, weights, config, judge, specs=specs, steps=steps, samples=g["samples"],
        method=g.get("method", "ancestral"), batch_size=batch_size, prompt=g.get("prompt"),
        seed=seed, sampler_kw={**sampler_kw, **sampler_endpoint(config.diffusion)},
        judge_batch_size=g.get("batch_size", 8),
        workdir=workdir_out, header=summary, log=_log)

  if lm_eval:  # {tasks, args, include_path, data}: lm-eval's tasks with the "loopjax" model
    rows = run_lm_eval(workdir, loops=[str(p) for p in specs], **lm_eval,
                       tasks_dir=os.path.join(workdir_out, "eval", "lm_eval_tasks"), model_args={
        "params": params, "step": step, "seed": seed, "batch_size": batch_size,
        "sampler": method, "steps": steps[0], "time_grid": time_points,
        **{k: v for k, v in sampler_kw.items() if k in ("temperature", "block_len")}})
    summary["lm_eval"] = rows
    _write(workdir_out, "lm_eval.json", {**summary, "tasks": lm_eval["tasks"], "rows": rows})
    _log(f"lm-eval {lm_eval['tasks']}: {len(rows)} loop policies")

  summary["plots"] = plot_paths
  summary["seconds"] = time.time() - t_start
  _write(workdir_out, "summary.json", summary)
  return summary


def plot_task_rows(rows, workdir: str, s_max: int | None = None) -> list[str]:
  """Every accuracy metric of the task rows vs loops and vs executed inference FLOPs per
  sample."""
  metrics = [k for k in rows[0] if k.endswith(("accuracy", "exact_match"))]
  out = []
  for m in metrics:
    out.append(plots.plot_quality_vs_loops(
        rows, metric=m, path=os.path.join(workdir, "plots", f"eval_{m}_vs_loops.png"),
        s_max=s_max))
    out.append(plots.plot_quality_vs_compute(
        rows, metric=m, path=os.path.join(workdir, "plots", f"eval_{m}_vs_flops.png"),
        s_max=s_max))
  return out


def _ints(s: str) -> list[int]:
  try:
    return [int(v) for v in s.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--steps {s!r}: want a comma list of integers (0: the default)") from None


def eval_main(argv) -> int:
  p = argparse.ArgumentParser(prog="loopjax eval", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--loops", action="append", default=None,
                 help=f"comma list of S or policies (repeatable; 0 or max = S_max); default "
                 f"{DEFAULT_LOOPS}")
  p.add_argument("--steps", default="0", help="comma list of denoising steps (0: one token "
                 "per step for built-in tasks and --gen-ppl, answer length for GSM8K)")
  p.add_argument("--sampler", default=None, choices=("confidence", "ancestral"),
                 help="default confidence for tasks and GSM8K, ancestral for --gen-ppl")
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--block-len", type=int, default=0, help="semi-autoregressive block size")
  p.add_argument("--examples", type=int, default=128, help="built-in task examples")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--nelbo-batches", type=int, default=2)
  p.add_argument("--time-points", type=int, default=8)
  p.add_argument("--no-nelbo", action="store_true")
  p.add_argument("--no-tasks", action="store_true")
  p.add_argument("--gsm8k", default=None, help="GSM8K-format JSONL file")
  p.add_argument("--gsm8k-limit", type=int, default=0)
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
  p.add_argument("--samples", type=int, default=64, help="--gen-ppl samples per S x steps")
  p.add_argument("--prompt", default=None, help="--gen-ppl: continue this text")
  p.add_argument("--judge-device", default="cpu", help="--gen-ppl: torch device of the judge")
  p.add_argument("--judge-batch-size", type=int, default=8)
  p.add_argument("--params", default=None, choices=("ema", "raw"),
                 help="workdir: which weights (default ema); an export holds one kind")
  p.add_argument("--step", type=parse_step, default=None, help="checkpoint step, or best (the lowest held-out NELBO of training); default: the newest")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write eval/ and plots/ here (default: the workdir; "
                 "beside an export folder, EXPORT.outputs)")
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
  a = p.parse_args(argv)
  check_counts(("--examples", a.examples, 1), ("--batch-size", a.batch_size, 1),
               ("--nelbo-batches", a.nelbo_batches, 1), ("--time-points", a.time_points, 1),
               ("--samples", a.samples, 1), ("--judge-batch-size", a.judge_batch_size, 1),
               ("--gsm8k-limit", a.gsm8k_limit, 0), ("--corpus-rows", a.corpus_rows, 0))
  if any(n < 0 for n in _ints(a.steps)):
    raise ValueError(f"--steps {a.steps}: denoising steps must be >= 0 (0: the default)")
  kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, block_len=a.block_len)
  gen = a.gen_ppl and dict(judge=a.gen_ppl, samples=a.samples, prompt=a.prompt,
                           method=a.sampler or "ancestral", device=a.judge_device,
                           batch_size=a.judge_batch_size)
  summary = run_eval(
      a.workdir, loops=a.loops or [DEFAULT_LOOPS], steps=_ints(a.steps),
      method=a.sampler or "confidence",
      examples=a.examples, batch_size=a.batch_size, nelbo_batches=a.nelbo_batches,
      time_points=a.time_points, do_nelbo=not a.no_nelbo, do_tasks=not a.no_tasks,
      gsm8k=a.gsm8k, gsm8k_limit=a.gsm8k_limit, answer_len=a.answer_len, corpus=a.corpus,
      corpus_rows=a.corpus_rows, corpus_layout=a.corpus_layout, gen_ppl=gen or None,
      params=a.params, step=a.step, seed=a.seed, sampler_kw=kw,
      command="loopjax eval " + " ".join(argv), out=a.out,
      lm_eval=a.lm_eval and {"tasks": a.lm_eval, "args": a.lm_eval_args,
                             "include_path": a.include_path, "data": a.lm_eval_data})
  print(json.dumps({"eval": os.path.join(output_dir(a.workdir, a.out), "eval"),
                    "plots": summary["plots"],
                    "seconds": round(summary["seconds"], 1)}))
  return 0


if __name__ == "__main__":
  sys.exit(eval_main(sys.argv[1:]))
