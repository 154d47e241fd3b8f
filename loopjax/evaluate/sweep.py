"""The loop-scaling sweep of a trained run (`run_eval`, behind `loopjax eval`), written to
WORKDIR/eval and plots (an export folder: EXPORT.outputs/eval and plots; or the output folder
given). The evaluations are registered in evaluations.py; each runs only when asked for.

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

import os
import platform
import time

import jax

from loopjax.evaluate.loop_cost import default_sweep, warn_loop_cost
from loopjax.evaluate.outputs import claim_output_dir
from loopjax.evaluate.evaluations import Sweep, checked_options
from loopjax.io.load import load_model_dir
from loopjax.loops import split_specs


def machine() -> str:
  d = jax.devices()[0]
  return (f"{d.platform} {getattr(d, 'device_kind', '')} x{jax.device_count()}, "
          f"{os.cpu_count()} host cores, {platform.machine()}, jax {jax.__version__}")


def run_eval(workdir: str, evaluations: dict, *, loops=None, steps=(0,),
             method: str = "confidence", batch_size: int = 64, seed: int = 0,
             sampler_kw: dict | None = None, params: str | None = None, step=None,
             command: str = "", out: str | None = None) -> dict:
  """Runs the registered `evaluations` ({name: options}, loopjax/evaluate/evaluations.py) at
  every loop policy of `loops` (`--loops` values; None: `default_sweep`) and writes their
  eval/*.json and plots/*.png under `output_dir(workdir, out)`; returns the summary dict (also
  eval/summary.json), each evaluation's rows under its name."""
  t_start = time.time()
  # Every file and folder named is checked before the model loads and anything compiles.
  workdir_out = claim_output_dir(workdir, out)
  options = checked_options(evaluations)
  # A training workdir or a `loopjax export` folder.
  loaded = load_model_dir(workdir, step=step, params=params)
  config, cfg = loaded.config, loaded.model.cfg
  loops = loops or [",".join(map(str, default_sweep(cfg.max_loops, cfg.looped)))]
  # Each `--loops` value parsed and resolved once, before any work: a policy this model cannot
  # run fails here, and the evaluations receive the resolved LoopPolicy objects.
  specs = [loaded.policy(s) for s in split_specs(loops)]
  samples = options["tasks"][1]["examples"] if "tasks" in options else 1
  for s in specs:  # warn of the cost before anything compiles
    warn_loop_cost(cfg, s.largest, length=config.data.seq_len,
                   calls=max(steps, default=0) or config.data.seq_len, samples=samples)
  summary = {"workdir": os.path.abspath(workdir),
             "checkpoint_step": int(config.source.get("step") or 0),
             "params": config.source.get("params"), "s_max": cfg.max_loops,
             "source": config.data.source, "loops": [p.label for p in specs], "machine": machine(),
             "command": command}
  sweep = Sweep(workdir=workdir, out_dir=workdir_out, loaded=loaded, specs=specs,
                steps=list(steps), method=method,
                batch_size=batch_size, seed=seed, sampler_kw=dict(sampler_kw or {}),
                params=params, step=step, header=dict(summary))
  for name, (evaluation, opts) in options.items():  # registration order
    rows = evaluation.run(sweep, opts)
    if rows is not None:
      summary[name] = rows
  summary["plots"] = sweep.plots
  summary["seconds"] = time.time() - t_start
  sweep.write("summary.json", summary)
  return summary
