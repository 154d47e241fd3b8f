"""The paper's comparison: variants of one experiment, derived after the command-line overrides.

An experiment file describes the plain same-size MDM (the base) and names the variant in its
`variant` section (`name`, `baseline_steps`, the LoopMDM `block` [a, b) and `s_max`). After
`--config.x=` overrides, `resolve_variant` derives what the variant changes:

  mdm           the base model, no loop, `baseline_steps` steps
  loopmdm       block [a, b) looped, S ~ U{1..S_max}; steps FLOP-matched to mdm (paper rule)
  deep_mdm      a plain MDM whose per-step compute equals LoopMDM's (flops.matched_depth),
                trained for LoopMDM's steps (so total FLOPs match too)
  uniform_loop  every layer looped, S ~ U{1..k} with k chosen so E[depth] is closest to
                LoopMDM's; steps FLOP-matched to mdm
  mdm_matched   the base MDM trained for LoopMDM's step count (matched total FLOPs would need
                more steps; this is the "same steps" control)

Derived keys: model.loop_start, model.loop_end, loops.train, model.num_layers (deep_mdm) and
train.steps. A derived key that was overridden explicitly keeps the override; every other one is
set and logged. Step counts come from loopjax.flops, never typed by hand, with F_base counted by
`variant.flop_convention` (loopjax.flops.FLOP_CONVENTIONS). An empty name leaves
the config as written.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from loopjax import flops
from loopjax.loops import LoopDistribution
from loopjax.config.base import model_config

VARIANTS = ("mdm", "loopmdm", "deep_mdm", "uniform_loop", "mdm_matched")
# Overrides of these keys change what a variant derives (data.*: through the vocabulary, when
# model.vocab_size is 0).
_INPUT_PREFIXES = ("model.", "loops.", "variant.")
_INPUT_KEYS = ("data.seq_len", "train.batch_size")

log = logging.getLogger(__name__)


def paper_backbone(c, *, vocab_size: int, length: int, dropout: float = 0.1):
  """The paper's MDLM backbone and recipe (12 x 768, 12 heads, batch 512) on config `c`.

  Every value is MDLM's published one (kuleshov-group/mdlm configs/config.yaml,
  configs/model/small.yaml, configs/lr_scheduler/constant_warmup.yaml, models/dit.py,
  diffusion.py); tests/test_recipe.py holds the resolved configs against that table.
  """
  c.data.seq_len = length
  # vocab_multiple: not MDLM's; a padded vocabulary that mesh axes divide (no numerical change).
  c.model.update(vocab_size=vocab_size, vocab_multiple=128, max_length=length, width=768,
                 num_layers=12, num_heads=12, cond_dim=128, dropout=dropout, mlp_hidden_dropout=False,
                 embed_init="mdlm", dense_init="torch", zero_init_head=True, norm_eps=1e-5,
                 time_conditioning=False, dtype="bfloat16", remat="dots_no_batch")
  c.train.update(batch_size=512, lr=3e-4, warmup_steps=2500, lr_schedule="constant",
                 weight_decay=0.0, b1=0.9, b2=0.999, adam_eps=1e-8, clip_norm=1.0,
                 ema_decay=0.9999, ema_warmup=True, log_every=100, checkpoint_every=10_000,
                 eval_every=10_000, eval_batches=8)
  # MDLM's sampler: steps from t = 1 to t = 1e-5 (diffusion.py `_sample(eps=1e-5)`), then one
  # argmax denoising of the positions still masked (`sampling.noise_removal: True`).
  c.diffusion.update(schedule="linear", eps=1e-3, antithetic=True, final_step="argmax",
                     sample_eps=1e-5)
  # The paper's F_loop = F_base + (E[S] - 1) n_m F_layer leaves F_base unstated; the variants
  # match with F_base = every forward matmul (head included). `loopjax flops --match` also
  # reports the layers-only and 6ND step counts.
  c.variant.flop_convention = "all_forward"
  return c


def _model(c, loops_train: str | None = None, **model_edits):
  """(ModelConfig, LoopDistribution) of `c` with some model keys and loops.train replaced."""
  c = c.copy_and_resolve_references()
  c.model.update(model_edits)
  if loops_train is not None:
    c.loops.train = loops_train
  dist = LoopDistribution.parse(c.loops.train)
  return model_config(c, loops=dist), dist


def _get(c, key: str):
  section, name = key.split(".")
  return c[section][name]


def resolve_variant(c, overrides: Mapping[str, Any] | None = None):
  """Sets the values variant `c.variant.name` derives from the (overridden) base config `c`.

  `overrides`: the keys set explicitly on the command line, with their values. Derived keys
  among them keep their values (later derivations use them); overrides of derivation inputs
  are named in the log. Edits and returns `c`.
  """
  overrides = dict(overrides or {})
  v = c.get("variant")
  if not v or not v.name:
    return c
  if v.name not in VARIANTS:
    raise ValueError(f"unknown variant {v.name!r}; choose one of {', '.join(VARIANTS)}")
  if int(v.baseline_steps) < 1:
    raise ValueError(f"variant {v.name}: variant.baseline_steps (mdm's step count, the budget "
                     f"every variant matches) must be >= 1, got {v.baseline_steps}")
  prefixes = _INPUT_PREFIXES + (("data.",) if not c.model.vocab_size else ())
  inputs = [f"{k}={val}" for k, val in overrides.items() if k != "variant.name"
            and (k.startswith(prefixes) or k in _INPUT_KEYS)]
  note = f"; re-derived for {', '.join(inputs)}" if inputs else ""

  def put(key, value, why, computed=True):
    """Sets a derived key unless it was overridden; logs either way."""
    if key in overrides:
      log.info("%s = %s (kept from --config.%s; %s would derive %s)", key, _get(c, key), key,
               v.name, value)
    else:
      section, name = key.split(".")
      c[section][name] = value
      log.info("%s = %s (%s%s)", key, value, why, note if computed else "")

  length, batch, baseline = c.data.seq_len, c.train.batch_size, int(v.baseline_steps)
  start, end = (int(x) for x in v.block)
  s_max = int(v.s_max)
  # The FLOP matching below divides by these: checked first, by name.
  for key, value in (("data.seq_len", length), ("train.batch_size", batch),
                     ("variant.s_max", s_max)):
    if int(value) < 1:
      raise ValueError(f"{key} must be >= 1, got {value}: set --config.{key} to a positive "
                       "integer")
  base, _ = _model(c, "fixed:1", loop_start=0, loop_end=0)
  loop_cfg, loop_dist = _model(c, f"uniform:1:{s_max}", loop_start=start, loop_end=end)
  convention = v.get("flop_convention", "all_forward")
  loop_steps = round(flops.matched_steps(loop_cfg, loop_dist, base, None, baseline, length,
                                         batch, convention=convention))
  matched = f"FLOP-matched to mdm's {baseline} steps"

  if v.name == "mdm":
    put("train.steps", baseline, "mdm's baseline steps", computed=False)
  elif v.name in ("mdm_matched", "deep_mdm"):
    if v.name == "deep_mdm":
      exact, depth = flops.matched_depth(loop_cfg, loop_dist, length)
      put("model.num_layers", depth,
          f"compute-matched to loopmdm, block [{start}, {end}) x U{{1..{s_max}}}: {exact:.2f} "
          "layers")
    put("train.steps", loop_steps, f"loopmdm's steps, {matched}")
  else:
    if v.name == "loopmdm":
      block, loops = (start, end), f"uniform:1:{s_max}"
      why = f"loopmdm: block [{start}, {end}) looped, S ~ U{{1..{s_max}}}"
    else:  # uniform_loop
      target = loop_cfg.executed_depth(1) + (loop_dist.expected - 1) * loop_cfg.block_layers
      n = base.num_layers
      k = min(range(1, s_max + 1), key=lambda k: abs(n * (k + 1) / 2 - target))
      block, loops = (0, n), f"uniform:1:{k}"
      why = f"uniform_loop: all {n} layers looped, E[depth] closest to loopmdm's {target:g}"
    fixed = v.name == "loopmdm"  # the block and S of loopmdm are the variant's own numbers
    put("model.loop_start", block[0], why, computed=not fixed)
    put("model.loop_end", block[1], why, computed=not fixed)
    put("loops.train", loops, why, computed=not fixed)
    cfg, dist = _model(c)
    put("train.steps", round(flops.matched_steps(cfg, dist, base, None, baseline, length, batch,
                                                 convention=convention)), matched)
  return c
