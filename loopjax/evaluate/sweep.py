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

import json
import os
import platform
import time

import jax

from loopjax.data import make_eval_batches, tokenizer_for
from loopjax.diffusion import make_schedule
from loopjax.diffusion.samplers import sampler_endpoint
from loopjax.evaluate import plots, tables
from loopjax.evaluate.loop_cost import default_sweep, parse_loops_arg, warn_loop_cost
from loopjax.evaluate.outputs import claim_output_dir
from loopjax.evaluate.denoiser import resolve_policy
from loopjax.evaluate.gsm8k import gsm8k_accuracy, read_gsm8k
from loopjax.evaluate.gen_ppl import check_judge, gen_ppl_sweep, load_judge
from loopjax.evaluate.harness import check_lm_eval, parse_task_data, run_lm_eval
from loopjax.evaluate.likelihood import heldout_nelbo
from loopjax.evaluate.tasks import heldout_batches, task_accuracy
from loopjax.evaluate.zero_shot import parse_corpus, zero_shot_eval
from loopjax.weights import load_model_dir

def parse_loops(specs) -> list[str]:
  """`--loops` values: comma lists of S or policies ("1,2,4,adaptive:0.01"); a schedule table
  ("time:8,4,2") is taken whole."""
  out = []
  for spec in specs:
    if spec.startswith(("time:", "mask:")):
      out.append(spec)
    else:
      out.extend(s.strip() for s in spec.split(",") if s.strip())
  return out


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


def run_eval(workdir: str, *, loops=None, steps=(0,), method: str = "confidence",
             examples: int = 128, batch_size: int = 64, nelbo_batches: int = 2,
             time_points: int = 8, do_nelbo: bool = True, do_tasks: bool = True,
             gsm8k: str | None = None, gsm8k_limit: int = 0, answer_len: int | None = None,
             corpus=(), corpus_rows: int = 0, corpus_layout: str = "auto",
             gen_ppl: dict | None = None, params: str | None = None, step: int | None = None,
             seed: int = 0, sampler_kw: dict | None = None, command: str = "",
             out: str | None = None, lm_eval: dict | None = None) -> dict:
  """Runs the sweep (`loops`: `--loops` values; None: `default_sweep`) and writes eval/*.json
  and plots/*.png under `output_dir(workdir, out)`;
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
  loops = loops or [",".join(map(str, default_sweep(cfg.max_loops, cfg.looped)))]
  specs = [parse_loops_arg(s, cfg.max_loops) for s in parse_loops(loops)]
  for s in specs:  # fail (or warn of the cost) before any work on a policy this model cannot run
    warn_loop_cost(cfg, resolve_policy(cfg, s).largest, length=config.data.seq_len,
                   calls=max(steps, default=0) or config.data.seq_len, samples=examples)
  judge = (load_judge(gen_ppl["judge"], device=gen_ppl.get("device", "cpu"))
           if gen_ppl else None)
  source = config.data.source
  sampler_kw = dict(sampler_kw or {})
  summary = {"workdir": os.path.abspath(workdir), "checkpoint_step": int(ckpt),
             "params": config.source.get("params"), "s_max": cfg.max_loops, "source": source,
             "loops": specs, "machine": machine(), "command": command}
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
    rows = run_lm_eval(workdir, loops=specs, **lm_eval,
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
