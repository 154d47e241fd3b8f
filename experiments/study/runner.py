"""The study's runs: configs from the base config, training with a cache, scoring, study.json.

Models (loopjax/config/variants.py, FLOP-matched to the MDM's budget B):
  mdm          the base MDM, trained mdm_extend x B (its checkpoints are shorter runs: the
               learning rate is constant after warm-up)
  loopmdm      block [1, 3) looped, S ~ U{1..12} (the paper's placement)
  deep_mdm     a plain MDM with LoopMDM's per-step compute, LoopMDM's steps
  loopmdm_s4   the same block with S ~ U{1..4} (ablation of the training range)
The learning rate of each model is chosen on `lr_seed` (lowest held-out NELBO at budget B),
which is not among the reported seeds.
"""

from __future__ import annotations

import json
import os
import time

from loopjax import flops
from loopjax.data.tokenizers import make_tokenizer
from loopjax.loops import LoopDistribution
from loopjax.config.base import base_config, model_config
from loopjax.train.loop import NonFiniteLossError, train
from loopjax.config.variants import resolve_variant

from experiments.study import corpus as corpus_lib
from experiments.study import measure, report, scoring
from experiments.study.presets import PRESETS

MODELS = ("mdm", "loopmdm", "deep_mdm", "loopmdm_s4")
_VARIANT = {"mdm": "mdm", "loopmdm": "loopmdm", "deep_mdm": "deep_mdm", "loopmdm_s4": "loopmdm"}
# Checkpoint indices (in units of B / units) at which the MDM's curve is scored.
_MDM_POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_LOOP_POINTS = (1, 2, 4, 8)  # of 8 checkpoints per LoopMDM-type run: B/8 .. B


class Counter:
  trained = 0  # training runs started (not found finished in the cache)


def s_max_of(p: dict, model: str) -> int:
  return int(p.get("ablation_s_max", 4)) if model == "loopmdm_s4" else int(p.get("s_max", 12))


def run_config(p: dict, model: str, *, lr: float, seed: int, train_path: str, extend: int):
  """The experiment config of one run; `extend` multiplies the MDM's budget."""
  c = base_config()
  c.data.update(source="text", paths=train_path, packing=True, tokenizer="byte",
                seq_len=p["seq_len"], eval_examples=64)
  c.model.update(p["model"], max_length=p["seq_len"])
  c.diffusion.update(schedule="linear", eps=1e-3, antithetic=True)
  c.train.update(batch_size=p["batch_size"], warmup_steps=p["warmup_steps"], lr=lr, seed=seed,
                 lr_schedule="constant", weight_decay=0.0, b2=0.999, ema_decay=p["ema_decay"],
                 ema_warmup=True, writers="jsonl", async_checkpoints=False, keep_best=0,
                 eval_batches=1)
  c.variant.update(name=_VARIANT[model], baseline_steps=p["baseline_steps"],
                   block=tuple(p.get("block", (1, 3))), s_max=s_max_of(p, model),
                   flop_convention="all_forward")
  resolve_variant(c)
  if model == "mdm":
    unit = max(p["baseline_steps"] // p["units"], 1)
    steps = unit * p["units"] * extend
  else:
    unit = max(round(c.train.steps / 8), 1)
    steps = 8 * unit
  c.train.update(steps=steps, checkpoint_every=unit, keep_checkpoints=steps // unit + 1,
                 log_every=unit, eval_every=steps)
  return c


def flops_per_step(c) -> float:
  return float(flops.expected_train_flops_per_step(
      model_config(c), c.data.seq_len, c.train.batch_size, LoopDistribution.parse(c.loops.train)))


def run_study(workdir: str, *, preset: str = "cpu", corpus: str | None = None,
              log=print) -> dict:
  if preset not in PRESETS:
    raise ValueError(f"--preset {preset!r} is not a study preset: choose one of "
                     f"{sorted(PRESETS)}")
  p = PRESETS[preset]
  folder = os.path.expanduser(corpus or p["corpus"] or "")
  if not folder:
    raise ValueError(f"the {preset} preset has no default corpus: pass --corpus FOLDER (a folder "
                     f"of fortune files; {corpus_lib.HOW_TO_GET})")
  corpus_lib.fortune_files(folder)  # fails fast, with how to get it
  t0 = time.time()
  say = lambda msg: log(f"[study {(time.time() - t0) / 60:5.1f} min] {msg}")
  split = corpus_lib.write_split(folder, os.path.join(workdir, "corpus"))
  say(f"corpus: {split['documents']['train']} training and {split['documents']['heldout']} "
      f"held-out documents ({split['bytes']['heldout']} held-out bytes)")
  tok = make_tokenizer("byte")
  batches = corpus_lib.heldout_batches(split["paths"]["heldout"], tok, seq_len=p["seq_len"],
                                       rows=p["eval_rows"], batch_size=p["eval_batch"])
  tp = p["time_points"]
  train_path = split["paths"]["train"]

  def trained(model, lr, seed, extend, curve=True):
    c = run_config(p, model, lr=lr, seed=seed, train_path=train_path, extend=extend)
    if not curve:  # a learning-rate trial is scored at its end only: no other checkpoint
      c.train.update(checkpoint_every=c.train.steps, keep_checkpoints=1)
    d = os.path.join(workdir, "runs", model, f"lr{lr:g}_seed{seed}" + (
        f"_x{extend}" if extend > 1 else ""))
    failed = os.path.join(d, "study_diverged.txt")
    bad = os.path.exists(failed)
    if not os.path.isdir(os.path.join(d, "checkpoints", str(c.train.steps))) and not bad:
      Counter.trained += 1
      start = time.time()
      try:
        train(c, d)
      except NonFiniteLossError as e:  # a learning rate too high for this model: a result
        os.makedirs(d, exist_ok=True)
        with open(failed, "w") as f:
          f.write(str(e))
        bad = True
      if not bad and not os.path.isdir(os.path.join(d, "checkpoints", str(c.train.steps))):
        # train() returns after saving where a stop request (Ctrl-C, SIGTERM) found it.
        raise KeyboardInterrupt(f"study stopped while training {d}; run the same command again "
                                "to resume")
      say(f"trained {model} lr {lr:g} seed {seed}: {c.train.steps} steps in "
          f"{time.time() - start:.0f} s")
    return c, d, os.path.exists(failed)

  def point(c, d, step, params="ema"):
    s = scoring.score_checkpoint(d, step, batches, time_points=tp, params=params)
    return dict(step=step, flops=step * flops_per_step(c), **s)

  result = dict(preset=preset, metric="held-out NELBO, bits per byte (byte-level tokens)",
                loop_block=list(p.get("block", (1, 3))), s_max=s_max_of(p, "loopmdm"),
                ablation_s_max=s_max_of(p, "loopmdm_s4"), corpus=split,
                heldout=dict(rows=p["eval_rows"], batches=len(batches), seq_len=p["seq_len"],
                             time_points=tp,
                             eval_seed=scoring.EVAL_SEED),
                lrs=list(p["lrs"]), lr_seed=p["lr_seed"], seeds=list(p["seeds"]),
                model_shape=p["model"], batch_size=p["batch_size"],
                baseline_steps=p["baseline_steps"], models={})
  for model in MODELS:
    sweep = []
    for lr in p["lrs"]:
      c, d, bad = trained(model, lr, p["lr_seed"], 1, curve=False)
      v = float("inf") if bad else point(c, d, c.train.steps)["bits_per_byte"]
      sweep.append(dict(lr=lr, bits_per_byte=v, diverged=bad))
    best = min(sweep, key=lambda r: r["bits_per_byte"])
    if best["diverged"]:
      raise RuntimeError(f"study: {model} diverged at every learning rate {p['lrs']}")
    say(f"{model}: held-out bits/byte by lr (seed {p['lr_seed']}) "
        + ", ".join(f"{r['lr']:g}: {r['bits_per_byte']:.4f}" for r in sweep)
        + f"; chosen {best['lr']:g}")
    seeds = []
    for seed in p["seeds"]:
      c, d, bad = trained(model, best["lr"], seed, p["mdm_extend"] if model == "mdm" else 1)
      if bad:
        raise RuntimeError(f"study: {model} at lr {best['lr']:g} diverged on seed {seed}; see {d}")
      unit = c.train.checkpoint_every
      idx = _MDM_POINTS if model == "mdm" else _LOOP_POINTS
      steps = [k * unit for k in idx if k * unit <= c.train.steps]
      curve = [point(c, d, s) for s in steps]
      raw = point(c, d, c.train.steps, params="raw")
      seeds.append(dict(seed=seed, dir=os.path.relpath(d, workdir), curve=curve, final_raw=raw))
      say(f"scored {model} seed {seed}: {len(curve)} checkpoints, final "
          f"{curve[-1]['bits_per_byte']:.4f} bits/byte (EMA), {raw['bits_per_byte']:.4f} (raw)")
    cfg = model_config(c)
    result["models"][model] = dict(
        layers=cfg.num_layers, loops=c.loops.train, params=flops.param_counts(cfg)["total"],
        flops_per_step=flops_per_step(c), steps=int(c.train.steps), best_lr=best["lr"],
        budget_flops=(c.train.steps // (p["mdm_extend"] if model == "mdm" else 1))
        * flops_per_step(c), lr_sweep=sweep, seeds=seeds)

  # Multipliers, gaps and the MDM's end slope, per seed.
  mdm = {s["seed"]: [(q["flops"], q["bits_per_byte"]) for q in s["curve"]]
         for s in result["models"]["mdm"]["seeds"]}
  for model in MODELS[1:]:
    for s in result["models"][model]["seeds"]:
      ref = mdm[s["seed"]]
      s["flop_multiplier"] = [dict(budget=q["flops"], **measure.flop_multiplier(
          ref, q["flops"], q["bits_per_byte"])) for q in s["curve"]]
      s["gap_at_equal_flops"] = [dict(budget=q["flops"], bits_per_byte=(
          None if measure.interpolate(ref, q["flops"]) is None
          else q["bits_per_byte"] - measure.interpolate(ref, q["flops"]))) for q in s["curve"]]
  for s in result["models"]["mdm"]["seeds"]:
    s["end_slope"] = measure.end_slope(mdm[s["seed"]])

  # LoopMDM at inference, and its attention, per reported seed.
  specs = [str(k) for k in p["loop_sweep"]] + [f"adaptive:{tau}" for tau in p["taus"]]
  att_batches = [{k: v[:p["attention_rows"]] for k, v in batches[0].items()}]
  loops_list = [k for k in p["loop_sweep"]]
  for s in result["models"]["loopmdm"]["seeds"]:
    d = os.path.join(workdir, s["dir"])
    s["loop_sweep"] = scoring.loop_sweep(d, batches, time_points=tp, specs=specs)
    say(f"loop sweep loopmdm seed {s['seed']}: " + ", ".join(
        f"S={r['loops']} {r['bits_per_byte']:.4f}" for r in s["loop_sweep"]))
    s["attention"] = scoring.attention(d, att_batches, loops_list=loops_list, time_points=4)
    say(f"attention loopmdm seed {s['seed']}: masked->masked share of the last iteration "
        + ", ".join(f"S={r['loops']} {r['final_iteration_share']:.3f}" for r in s["attention"]))
  result["seconds"] = time.time() - t0
  result["summary"] = report.summarize(result)
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(result, f, indent=1)
  md = report.markdown(result)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(md)
  result["plots"] = report.plots(result, os.path.join(workdir, "plots"))
  log(md)
  say("done")
  return result

