"""Attention among masked positions, per layer and loop iteration, as a function of S.

Definition. For one model call on a noised input x_t, layer l (in execution order) and head h,
let P[q, k] be the attention probabilities. The *masked-to-masked share* of that layer is

    share = mean over heads h, over masked query positions q of  sum_{k masked} P_h[q, k]

i.e. the fraction of its attention that a masked position spends on other masked positions
(itself included). It is averaged over held-out sequences and a fixed grid of noise levels t
(each t masks every free position with probability 1 - alpha(t); fixed/given positions never).
`chance` is the share a uniform attention would give: the mean fraction of masked keys seen by a
masked query. The paper reports this share rising with the loop count and saturating near S_max.

`analyze_attention` (`loopjax analyze attention`) writes eval/attention.json,
plots/attention_heatmap.png (executed layer x S) and plots/attention_vs_loops.png under the
workdir (an export folder: beside it, EXPORT.outputs; or the output folder given). A loop count
0 or `max` is S_max.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.data import make_eval_batches
from loopjax.diffusion import eval_time_grid, make_schedule, mask_tokens
from loopjax.evaluate import plots
from loopjax.evaluate.loop_cost import default_sweep, warn_loop_cost
from loopjax.evaluate.outputs import claim_output_dir, output_dir
from loopjax.model import LoopedTransformer
from loopjax.io.load import load_model_dir


def masked_share(probs_NxBxHxLxL, masked_BxL):
  """Per layer N: mean over heads and masked queries of the attention mass on masked keys.

  Returns (share_N, weight) with weight = number of masked queries (for averaging batches)."""
  m = masked_BxL.astype(jnp.float32)
  to_masked_NxBxHxL = jnp.einsum("nbhqk,bk->nbhq", probs_NxBxHxLxL, m)
  per_query_NxBxL = to_masked_NxBxHxL.mean(axis=2)
  total = jnp.maximum(m.sum(), 1.0)
  return (per_query_NxBxL * m[None]).sum(axis=(1, 2)) / total, m.sum()


def _execution_order(aux, loops: int):
  """Attention probs of every executed layer, in order: head, S block iterations, tail."""
  attn = aux["attn"]
  parts = [attn["head"]] if attn["head"] is not None else []
  if attn["loop"] is not None:
    parts += [attn["loop"][it] for it in range(loops)]
  if attn["tail"] is not None:
    parts.append(attn["tail"])
  return jnp.concatenate(parts, axis=0)


def layer_labels(cfg, loops: int) -> list[str]:
  if not cfg.looped:
    return [f"layer {i}" for i in range(cfg.num_layers)]
  labels = [f"head {i}" for i in range(cfg.loop_start)]
  labels += [f"loop {it + 1} / layer {cfg.loop_start + j}" for it in range(loops)
             for j in range(cfg.block_layers)]
  return labels + [f"tail {i}" for i in range(cfg.loop_end, cfg.num_layers)]


def attention_profile(model, params, batches, *, loops_list, time_points: int = 4,
                      schedule=None, seed: int = 0) -> dict:
  """Masked-to-masked attention share for every executed layer, for each S in `loops_list`."""
  cfg = model.cfg
  schedule = schedule or make_schedule({"schedule": "linear"})
  grid = np.asarray(eval_time_grid(time_points, schedule.eps))
  out = {"definition": __doc__.split("\n\n")[1], "time_grid": grid.tolist(), "per_loops": []}
  for loops in loops_list:
    loops = int(loops)
    if cfg.looped and cfg.loop_embedding and loops > cfg.max_loops:
      raise ValueError(f"S={loops} exceeds the loop-embedding table (S_max={cfg.max_loops})")
    run_cfg = dataclasses.replace(cfg, max_loops=loops) if cfg.looped else cfg
    m = LoopedTransformer(run_cfg)

    @jax.jit
    def one(params, x_t, t_B, seg, masked):
      _, aux = m.apply({"params": params}, x_t, loops, t_B, seg, collect=True)
      probs = _execution_order(aux, loops if cfg.looped else 0)
      share, w = masked_share(probs, masked)
      chance = (masked.sum(-1) * masked.sum(-1)).sum() / jnp.maximum(
          masked.sum(-1).sum() * masked.shape[1], 1)
      return share, w, chance

    total, weight, chance_sum = 0.0, 0.0, 0.0
    labels = layer_labels(cfg, loops)
    for bi, b in enumerate(batches):
      for ti, t in enumerate(grid):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), bi * 1000 + ti)
        tokens = jnp.asarray(b["tokens"])
        t_B = jnp.full((tokens.shape[0],), t, jnp.float32)
        x_t, masked = mask_tokens(rng, tokens, schedule.alpha(t_B), cfg.mask_id,
                                  jnp.asarray(b["fixed"]))
        share, w, chance = one(params, x_t, t_B, jnp.asarray(b["segment_ids"]), masked)
        total = total + np.asarray(share) * float(w)
        weight += float(w)
        chance_sum += float(chance) * float(w)
    share = (total / max(weight, 1.0)).tolist()
    n_head = cfg.loop_start if cfg.looped else cfg.num_layers
    loop_iters = []
    if cfg.looped:
      for it in range(loops):
        lo = n_head + it * cfg.block_layers
        loop_iters.append(float(np.mean(share[lo:lo + cfg.block_layers])))
    out["per_loops"].append(dict(loops=loops, layers=labels, share=share,
                                 loop_iteration_share=loop_iters,
                                 final_iteration_share=loop_iters[-1] if loop_iters else None,
                                 mean_share=float(np.mean(share)),
                                 chance=chance_sum / max(weight, 1.0)))
  return out


def same_prefixes(curves, tol: float = 1e-6) -> bool:
  """Whether every curve equals the start of the longest one (the looped block's iteration i
  computes the same thing whatever S follows it)."""
  longest = max(curves, key=len, default=[])
  return all(np.allclose(c, longest[:len(c)], atol=tol, rtol=0) for c in curves)


def plot_attention(result: dict, plots_dir: str) -> list[str]:
  """The heatmap (executed layer x S) and the share per loop iteration, in the one-column style
  of loopjax.evaluate.plots. Curves of several S that repeat one another (each S's iterations
  are the start of the longest S's) are drawn once, beside the tail layers' and the mean share
  as functions of S, which do differ."""
  plt = plots.plt

  os.makedirs(plots_dir, exist_ok=True)
  rows = result["per_loops"]
  depth = max(len(r["share"]) for r in rows)
  grid = np.full((depth, len(rows)), np.nan)
  for j, r in enumerate(rows):
    grid[:len(r["share"]), j] = r["share"]
  with plt.rc_context(plots.PAPER_STYLE):
    fig, ax = plt.subplots(figsize=(3.4, min(1.2 + 0.16 * depth, 4.5)))
    im = ax.imshow(grid, aspect="auto", origin="upper", cmap="viridis")
    ax.set_xticks(range(len(rows)), [str(r["loops"]) for r in rows])
    ax.set_xlabel("loops S")
    ax.set_ylabel("executed layer (head, loop iterations, tail)")
    ax.spines[["top", "right"]].set_visible(True)
    fig.colorbar(im, ax=ax, label="masked-to-masked attention share")
    heat = plots.save_figure(fig, os.path.join(plots_dir, "attention_heatmap.png"))

  with plt.rc_context(plots.PAPER_STYLE):
    fig, ax = plt.subplots()
    looped = [r for r in rows if r["loop_iteration_share"]]
    curves = [r["loop_iteration_share"] for r in looped]
    if curves and same_prefixes(curves):
      longest = max(curves, key=len)
      ax.plot(range(1, len(longest) + 1), longest, "o-", color=plots.series_style(0)[0],
              label="looped block, iteration i (same for every S ≥ i)")
    else:
      for k, r in enumerate(looped):
        color, marker, line = plots.series_style(k)
        its = np.arange(1, len(r["loop_iteration_share"]) + 1) * plots.dodge(k, len(looped))
        ax.plot(its, r["loop_iteration_share"], marker=marker, ls=line, color=color,
                label=f"looped block, S = {r['loops']}")
    s_values = [r["loops"] for r in rows]
    tail = [(r["loops"], float(np.mean(r["share"][len(r["share"]) - n_tail:])))
            for r in rows if (n_tail := _tail_layers(r))]
    if tail:
      color, marker, line = plots.series_style(1)
      ax.plot(*zip(*tail), marker=marker, ls=line, color=color,
              label="tail layers after S loops (mean)")
    color, marker, line = plots.series_style(2)
    ax.plot(s_values, [r["mean_share"] for r in rows], marker=marker, ls=line, color=color,
            label="all executed layers at S (mean)")
    ax.axhline(rows[0]["chance"], color="0.4", lw=0.8, ls=":", label="uniform attention")
    plots.loop_axis(ax, s_values)
    ax.set_xlabel("loop iteration i, or loops S")
    ax.set_ylabel("masked-to-masked attention share")
    plots.plain_axis(ax.yaxis)
    ax.grid(which="major")
    plots.legend_and_note(ax, "")
    line = plots.save_figure(fig, os.path.join(plots_dir, "attention_vs_loops.png"))
  return [heat, line]


def _tail_layers(row: dict) -> int:
  """How many of a row's executed layers come after the looped block."""
  return sum(1 for name in row["layers"] if str(name).startswith("tail"))


def _fixed_loops(policy) -> int:
  """S of a fixed `--loops` value (this analysis runs one S at a time, no adaptive policy)."""
  if policy.fixed_loops is None:
    raise ValueError(f"--loops {policy}: analyze takes fixed loop counts (N, or 0 / max for "
                     "S_max)")
  return policy.fixed_loops


def analyze_attention(workdir: str, *, loops: str = "", examples: int = 16,
                      time_points: int = 4, params: str | None = None, step=None,
                      out: str | None = None) -> tuple[dict, str, list[str]]:
  """Attention among masked positions vs loops of the run or export at `workdir` (loops: comma
  list of fixed S; empty: `default_sweep`); writes eval/attention.json and plots under
  `output_dir(workdir, out)`, prints one line per S; returns (result, json path, plot paths)."""
  claim_output_dir(workdir, out)
  loaded = load_model_dir(workdir, params=params, step=step)
  config, model, weights = loaded.config, loaded.model, loaded.params
  cfg = model.cfg
  if loops:
    loops_list = list(dict.fromkeys(_fixed_loops(loaded.policy(s))
                                    for s in loops.split(",") if s.strip()))
  else:
    loops_list = default_sweep(cfg.max_loops, cfg.looped)
  if config.data.get("source") is None:
    raise ValueError(f"{workdir} carries no data config to draw held-out examples from")
  warn_loop_cost(cfg, max(loops_list), length=config.data.seq_len,
                 calls=time_points, samples=examples)
  batch = min(examples, 8)
  batches = make_eval_batches(loaded.data, batch_size=batch,
                              num_batches=max(examples // batch, 1),
                              seed=int(config.get("train", {}).get("seed", 0)) + 2)
  result = attention_profile(model, weights, batches, loops_list=loops_list,
                             time_points=time_points,
                             schedule=make_schedule(config.diffusion))
  outdir = output_dir(workdir, out)
  os.makedirs(os.path.join(outdir, "eval"), exist_ok=True)
  path = os.path.join(outdir, "eval", "attention.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  plot_paths = plot_attention(result, os.path.join(outdir, "plots"))
  for r in result["per_loops"]:
    fin = r["final_iteration_share"]
    print(f"S={r['loops']:>3}  mean share {r['mean_share']:.3f}  last loop iteration "
          f"{'-' if fin is None else f'{fin:.3f}'}  (uniform {r['chance']:.3f})")
  return result, path, plot_paths
