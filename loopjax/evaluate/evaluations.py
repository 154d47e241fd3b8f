"""The evaluations of `loopjax eval`, registered by name: each is a function of the loaded sweep
and its own options, with a check of those options that runs before any model loads.

Adding an evaluation is one `@register(NAME, check=...)` function here: it reads what it needs
from the `Sweep` (the loaded model: its weights, config, data and tokenizer; the loop policies,
resolved by `Loaded.policy`; denoising steps, sampler settings), writes
its eval/NAME.json through `sweep.write` and its plots, and returns the rows that go into
summary.json under NAME (None: nothing to report for this run, e.g. no built-in task).
`run_eval` (sweep.py) runs the requested ones in registration order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from loopjax.data import make_eval_batches
from loopjax.diffusion import make_schedule
from loopjax.diffusion.samplers import sampler_endpoint
from loopjax.evaluate import plots, tables
from loopjax.evaluate.gen_ppl import check_judge, gen_ppl_sweep, load_judge
from loopjax.evaluate.gsm8k import gsm8k_accuracy, read_gsm8k
from loopjax.evaluate.harness import check_lm_eval, parse_task_data, run_lm_eval
from loopjax.evaluate.likelihood import heldout_nelbo
from loopjax.evaluate.tasks import heldout_batches, task_accuracy
from loopjax.evaluate.zero_shot import parse_corpus, zero_shot_eval
from loopjax.io.load import Loaded


@dataclasses.dataclass(frozen=True)
class Evaluation:
  name: str
  run: Callable[["Sweep", dict], Any]
  check: Callable[[dict], dict]
  defaults: dict


EVALUATIONS: dict[str, Evaluation] = {}


def register(name: str, *, check: Callable[[dict], dict] | None = None, **defaults):
  """Registers the decorated `run(sweep, options)` as evaluation `name`; `defaults` are its
  options' default values (any other option is refused), `check(options)` validates them before
  the model loads and returns them (possibly with files read)."""
  def wrap(run):
    if name in EVALUATIONS:
      raise ValueError(f"evaluation {name!r} is registered twice")
    EVALUATIONS[name] = Evaluation(name, run, check or (lambda o: o), defaults)
    return run
  return wrap


def checked_options(requested: dict) -> dict:
  """{name: (Evaluation, options)} in registration order, with defaults filled in and each
  evaluation's check run: ValueError naming an unknown evaluation or option."""
  for name, options in requested.items():
    if name not in EVALUATIONS:
      raise ValueError(f"unknown evaluation {name!r}; registered: {', '.join(EVALUATIONS)}")
    unknown = set(options or {}) - set(EVALUATIONS[name].defaults)
    if unknown:
      raise ValueError(f"evaluation {name!r}: unknown option(s) {sorted(unknown)}; it takes "
                       f"{sorted(EVALUATIONS[name].defaults)}")
  return {name: (e, e.check({**e.defaults, **(requested[name] or {})}))
          for name, e in EVALUATIONS.items() if name in requested}


@dataclasses.dataclass
class Sweep:
  """What every evaluation of one `run_eval` shares: the `Loaded` model (loopjax.io.load) and
  `specs`, its loop policies (LoopPolicy objects, resolved once by `loaded.policy`)."""
  workdir: str
  out_dir: str
  loaded: Loaded
  specs: list
  steps: list
  method: str
  batch_size: int
  seed: int
  sampler_kw: dict
  params: str | None
  step: Any
  header: dict
  plots: list = dataclasses.field(default_factory=list)

  @property
  def cfg(self):
    return self.loaded.model.cfg

  @property
  def eval_seed(self) -> int:
    return int(self.loaded.config.get("train", {}).get("seed", 0)) + 1

  def write(self, name: str, obj) -> str:
    path = os.path.join(self.out_dir, "eval", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2)
    if isinstance(obj, dict) and obj.get("rows"):  # NAME.md / NAME.tex beside NAME.json
      tables.write_eval_tables(path, obj["rows"])
    return path

  def plot_path(self, name: str) -> str:
    return os.path.join(self.out_dir, "plots", name)


def log(msg: str) -> None:
  print(msg, flush=True)


@register("likelihood", batches=2, time_points=8)
def likelihood(sw: Sweep, o: dict):
  """Held-out NELBO, bits/token and perplexity bound per loop policy (likelihood.json)."""
  schedule = make_schedule(sw.loaded.config.diffusion)
  batches = make_eval_batches(sw.loaded.data, batch_size=sw.batch_size,
                              num_batches=o["batches"], seed=sw.eval_seed)
  rows = []
  for s in sw.specs:
    row = heldout_nelbo(sw.loaded.model, sw.loaded.params, batches, schedule=schedule, loops=s,
                        time_points=o["time_points"], seed=sw.seed)
    rows.append(row)
    log(f"nelbo  S={s:<14} bits/token {row['bits_per_token']:.4f}  "
        f"ppl<= {row['ppl_bound']:.3f}")
  sw.write("likelihood.json", {**sw.header, "rows": rows})
  sw.plots.append(plots.plot_quality_vs_loops(
      rows, metric="bits_per_token", group="none", path=sw.plot_path("eval_bits_vs_loops.png"),
      title="held-out NELBO vs loops", s_max=sw.cfg.max_loops))
  return rows


@register("tasks", examples=128)
def tasks(sw: Sweep, o: dict):
  """Built-in task accuracy (Sudoku, arithmetic) per denoising steps x loop policy."""
  source = sw.loaded.config.data.source
  if source not in ("sudoku", "arithmetic"):
    return None
  batches = heldout_batches(sw.loaded.data, o["examples"], seed=sw.eval_seed,
                            batch_size=sw.batch_size)
  rows = []
  for n_steps in sw.steps:
    for s in sw.specs:
      row = task_accuracy(sw.loaded.model, sw.loaded.params, batches, source=source, loops=s,
                          steps=n_steps, method=sw.method, seed=sw.seed, **sw.sampler_kw)
      rows.append(row)
      accs = "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                       if k.endswith(("accuracy", "exact_match")))
      log(f"task   S={s:<14} steps {row['steps']:<3} {accs}  loops {row['loops_mean']:.2f}"
          f" (executed {row['executed_loops_mean']:.2f})  {row['seconds']:.2f}s")
  sw.write("tasks.json", {**sw.header, "rows": rows})
  sw.plots.extend(plot_task_rows(rows, sw.out_dir, s_max=sw.cfg.max_loops))
  return rows


def _check_gsm8k(o: dict) -> dict:
  return {**o, "examples": read_gsm8k(o["file"], o["limit"])}


@register("gsm8k", check=_check_gsm8k, file=None, limit=0, answer_len=None, examples=None)
def gsm8k(sw: Sweep, o: dict):
  """GSM8K-format JSONL exact match per denoising steps x loop policy."""
  config, exs = sw.loaded.config, o["examples"]
  tok = sw.loaded.tokenizer
  # A model fine-tuned on prompt_answer data is asked in its training layout.
  tuned = config.data.get("source") == "prompt_answer"
  template = config.data.get("prompt_template") if tuned else None
  answer_len = o["answer_len"] or (int(config.data.get("answer_len")) if tuned else 64)
  rows = []
  for n_steps in sw.steps:
    for s in sw.specs:
      row = gsm8k_accuracy(sw.loaded.model, sw.loaded.params, tok, exs,
                           seq_len=config.data.seq_len, loops=s, answer_len=answer_len,
                           steps=n_steps or answer_len, method=sw.method,
                           batch_size=min(sw.batch_size, len(exs)), seed=sw.seed,
                           **({"template": template} if template else {}), **sw.sampler_kw)
      rows.append(row)
      log(f"gsm8k  S={s:<14} exact match {row['exact_match']:.4f}")
  sw.write("gsm8k.json", {**sw.header, "file": o["file"], "rows": rows})
  sw.plots.append(plots.plot_quality_vs_compute(
      rows, metric="exact_match", path=sw.plot_path("eval_gsm8k_vs_flops.png"),
      s_max=sw.cfg.max_loops))
  return rows


def _check_zero_shot(o: dict) -> dict:
  for c in o["corpus"]:
    parse_corpus(c)
  return o


@register("zero_shot", check=_check_zero_shot, corpus=(), rows=0, layout="auto", time_points=8)
def zero_shot(sw: Sweep, o: dict):
  """Perplexity bound on local corpora, corpus x loop policy."""
  zs = zero_shot_eval(sw.loaded.model, sw.loaded.params, sw.loaded.config, o["corpus"], sw.specs,
                      schedule=make_schedule(sw.loaded.config.diffusion),
                      tokenizer=sw.loaded.tokenizer, batch_size=sw.batch_size,
                      time_points=o["time_points"], max_rows=o["rows"], layout=o["layout"],
                      seed=sw.seed, log=log)
  sw.write("zero_shot.json", {**sw.header, **zs})
  sw.plots.append(plots.plot_quality_vs_loops(
      zs["rows"], metric="ppl_bound", group="corpus",
      path=sw.plot_path("eval_zero_shot_ppl_vs_loops.png"), s_max=sw.cfg.max_loops))
  return zs["rows"]


def _check_gen_ppl(o: dict) -> dict:
  check_judge(o["judge"])
  return o


@register("gen_ppl", check=_check_gen_ppl, judge=None, samples=64, method="ancestral",
          prompt=None, device="cpu", batch_size=8)
def gen_ppl(sw: Sweep, o: dict):
  """Generative perplexity under a local judge LM and unigram entropy, per S x steps."""
  judge = load_judge(o["judge"], device=o["device"])
  return gen_ppl_sweep(
      sw.loaded, judge, specs=sw.specs, steps=sw.steps,
      samples=o["samples"], method=o["method"], batch_size=sw.batch_size, prompt=o["prompt"],
      seed=sw.seed, sampler_kw={**sw.sampler_kw, **sampler_endpoint(sw.loaded.config.diffusion)},
      judge_batch_size=o["batch_size"], workdir=sw.out_dir, header=sw.header, log=log)


def _check_lm_eval(o: dict) -> dict:
  o = {**o, "data": parse_task_data(o["data"])}
  check_lm_eval(o["tasks"], o["include_path"], o["data"])
  return o


@register("lm_eval", check=_check_lm_eval, tasks=None, args=None, include_path=None, data=(),
          time_grid=8)
def lm_eval(sw: Sweep, o: dict):
  """lm-evaluation-harness tasks with the "loopjax" model at every loop policy."""
  kw = sw.sampler_kw
  rows = run_lm_eval(sw.workdir, loops=sw.specs, tasks=o["tasks"], args=o["args"],
                     include_path=o["include_path"], data=o["data"], loaded=sw.loaded,
                     tasks_dir=os.path.join(sw.out_dir, "eval", "lm_eval_tasks"), model_args={
      "params": sw.params, "step": sw.step, "seed": sw.seed, "batch_size": sw.batch_size,
      "sampler": sw.method, "steps": sw.steps[0], "time_grid": o["time_grid"],
      **{k: v for k, v in kw.items() if k in ("temperature", "block_len")}})
  sw.write("lm_eval.json", {**sw.header, "tasks": o["tasks"], "rows": rows})
  log(f"lm-eval {o['tasks']}: {len(rows)} loop policies")
  return rows


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
