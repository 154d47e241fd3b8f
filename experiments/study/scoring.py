"""Held-out NELBO of the study's checkpoints and inference settings, each computed once.

Every score uses the same held-out batches and the same Monte-Carlo seed (times on a fixed
midpoint grid, one mask draw per time), so models, seeds and loop counts are compared on the
same noise. Results are cached in JSON files next to the run, keyed by what they depend on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.diffusion import eval_time_grid, make_schedule, mask_tokens
from loopjax.evaluate.attention import attention_profile
from loopjax.inference.denoiser import compiled_policy, loop_args, make_denoiser, memo
from loopjax.evaluate.intervals import weighted_mean_se
from loopjax.evaluate.likelihood import heldout_nelbo
from loopjax.flops import forward_flops_per_seq
from loopjax.io.load import load_model_dir

EVAL_SEED = 1234  # the Monte-Carlo draws of every held-out score; no training seed enters


_MODELS: dict = {}


def _load(run_dir: str, **kw):
  """The run's Loaded (load_model_dir), with one model object per architecture: the evaluation
  programs, memoised per model object, then compile once for all checkpoints and seeds of a
  model."""
  loaded = load_model_dir(run_dir, **kw)
  return dataclasses.replace(loaded, model=_MODELS.setdefault(loaded.model.cfg, loaded.model))


class Counter:
  """How many scores were computed (not read from a cache): the tests check re-runs."""
  computed = 0


def cached(path: str, key: dict, compute):
  """compute() once per key; a re-run reads the saved value."""
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("key") == key:
      return saved["value"]
  Counter.computed += 1
  value = compute()
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(dict(key=key, value=value), f, indent=1)
  os.replace(tmp, path)
  return value


def nelbo_per_batch(model, params, batches, *, schedule, loops, time_points: int) -> dict:
  """Held-out bits per byte at the resolved LoopPolicy `loops` (`Loaded.policy`), batch by batch
  (batch k draws with seed EVAL_SEED + k, as one heldout_nelbo call over all batches would): the
  token-weighted mean, its standard error over batches, and the per-batch values, from which
  paired differences get their own error."""
  vals, tokens = [], []
  for k, b in enumerate(batches):
    out = heldout_nelbo(model, params, [b], schedule=schedule, loops=loops,
                        time_points=time_points, seed=EVAL_SEED + k)
    vals.append(out["bits_per_token"])
    tokens.append(out["tokens"])
  mean, se = weighted_mean_se(vals, tokens)
  return dict(bits_per_byte=float(mean), se=float(se or 0.0), batches=vals, tokens=tokens)


def score_checkpoint(run_dir: str, step: int, batches, *, time_points: int, params: str,
                     loops=0) -> dict:
  """Held-out bits per byte of one checkpoint (EMA or raw weights) at `loops` (0: S_max)."""
  def compute():
    loaded = _load(run_dir, step=step, params=params)
    cfg = loaded.model.cfg
    s = loops or (cfg.max_loops if cfg.looped else 1)
    return nelbo_per_batch(loaded.model, loaded.params, batches,
                           schedule=make_schedule(loaded.config.diffusion),
                           loops=loaded.policy(s), time_points=time_points)

  key = dict(step=step, params=params, loops=loops, time_points=time_points,
             rows=sum(len(b["tokens"]) for b in batches), batches=len(batches))
  name = f"score_{step}_{params}_{loops}.json"
  return cached(os.path.join(run_dir, name), key, compute)


def _executed_loops_fn(model, policy):
  """fn(params, tokens, fixed, seg, t, rng, loop_args) -> loops_B of one denoiser call at
  time t (one program for every fixed and adaptive setting of a model)."""
  policy = compiled_policy(policy)
  return memo(("study_loops", id(model), policy), model, lambda: _build_loops_fn(model, policy))


def _build_loops_fn(model, policy):
  schedule = make_schedule({"schedule": "linear"})

  @jax.jit
  def fn(params, tokens, fixed, seg, t, rng, loop_arr):
    t_B = jnp.full((tokens.shape[0],), t, jnp.float32)
    x_t, masked = mask_tokens(rng, tokens, schedule.alpha(t_B), model.cfg.mask_id, fixed)
    denoise = make_denoiser(model, params, policy, seg, loop_arr)
    frac = masked.sum(-1) / jnp.maximum((~fixed).sum(-1), 1)
    return denoise(x_t, t_B, frac)[1]

  return fn


def loop_sweep(run_dir: str, batches, *, time_points: int, specs: list[str]) -> list[dict]:
  """The final checkpoint at each inference setting: bits per byte, loops per call (per
  sequence and as the batch executed them), executed forward FLOPs per sequence, and the wall
  time of scoring (after a first, compiling pass)."""
  def compute():
    loaded = _load(run_dir)
    model, tree = loaded.model, loaded.params
    schedule = make_schedule(loaded.config.diffusion)
    length = int(np.shape(batches[0]["tokens"])[1])
    rows = []
    for spec in specs:
      policy = loaded.policy(spec)  # parsed and resolved once for all of this spec's scores
      kw = dict(schedule=schedule, loops=policy, time_points=time_points)
      nelbo_per_batch(model, tree, batches[:1], **kw)  # compile
      t0 = time.perf_counter()
      out = nelbo_per_batch(model, tree, batches, **kw)
      seconds = time.perf_counter() - t0
      fn = _executed_loops_fn(model, policy)
      per_seq, executed = [], []
      grid = np.asarray(eval_time_grid(time_points, schedule.eps))
      for bi, b in enumerate(batches):
        for ti, t in enumerate(grid):
          loops_B = np.asarray(fn(tree, jnp.asarray(b["tokens"]), jnp.asarray(b["fixed"], bool),
                                  jnp.asarray(b["segment_ids"]), float(t),
                                  jax.random.PRNGKey(EVAL_SEED + 1000 * bi + ti),
                                  loop_args(policy)))
          per_seq.append(float(loops_B.mean()))
          executed.append(int(loops_B.max()))
      ex = float(np.mean(executed))
      rows.append(dict(loops=spec, **out, seconds=seconds,
                       loops_per_sequence=float(np.mean(per_seq)), executed_loops=ex,
                       executed_flops_per_seq=float(forward_flops_per_seq(model.cfg, length, ex))))
    return rows

  key = dict(specs=specs, time_points=time_points, rows=sum(len(b["tokens"]) for b in batches),
             batches=len(batches))
  return cached(os.path.join(run_dir, "score_loop_sweep.json"), key, compute)


def attention(run_dir: str, batches, *, loops_list, time_points: int) -> list[dict]:
  """Masked->masked attention share of the final iteration of the looped block, per S."""
  def compute():
    loaded = _load(run_dir)
    prof = attention_profile(loaded.model, loaded.params, batches, loops_list=loops_list,
                             time_points=time_points,
                             schedule=make_schedule(loaded.config.diffusion),
                             seed=EVAL_SEED)
    return [dict(loops=r["loops"], final_iteration_share=r["final_iteration_share"],
                 mean_share=r["mean_share"], chance=r["chance"]) for r in prof["per_loops"]]

  key = dict(loops=list(loops_list), time_points=time_points,
             rows=sum(len(b["tokens"]) for b in batches), batches=len(batches))
  return cached(os.path.join(run_dir, "score_attention.json"), key, compute)


