"""The paper's comparison, as edits of one experiment config.

  mdm           the base model, no loop, `baseline_steps` steps
  loopmdm       block [a, b) looped, S ~ U{1..S_max}; steps FLOP-matched to mdm (paper rule)
  deep_mdm      a plain MDM whose per-step compute equals LoopMDM's (flops.matched_depth),
                trained for LoopMDM's steps (so total FLOPs match too)
  uniform_loop  every layer looped, S ~ U{1..k} with k chosen so E[depth] is closest to
                LoopMDM's; steps FLOP-matched to mdm
  mdm_matched   the base MDM trained for LoopMDM's step count (matched total FLOPs would need
                more steps; this is the "same steps" control)

Step counts come from loopjax.flops, never typed by hand.
"""

from __future__ import annotations

from loopjax import flops
from loopjax.model import LoopDistribution
from loopjax.train.config import model_config

VARIANTS = ("mdm", "loopmdm", "deep_mdm", "uniform_loop", "mdm_matched")


def paper_backbone(c, *, vocab_size: int, length: int, dropout: float = 0.0):
  """The paper's MDLM backbone and optimiser (12 x 768, 12 heads, batch 512) on config `c`."""
  c.data.seq_len = length
  c.model.update(vocab_size=vocab_size, max_length=length, width=768, num_layers=12,
                 num_heads=12, cond_dim=128, dropout=dropout, dtype="bfloat16",
                 remat="dots_no_batch")
  c.train.update(batch_size=512, lr=3e-4, warmup_steps=2500, lr_schedule="constant",
                 weight_decay=0.0, ema_decay=0.9999, log_every=100, checkpoint_every=10_000,
                 eval_every=10_000, eval_batches=8)
  return c


def _loop_variant(c, block, s_max):
  c.model.loop_start, c.model.loop_end = block
  c.loops.train = f"uniform:1:{s_max}"
  return c


def apply_variant(c, variant: str, *, baseline_steps: int, block=(1, 3), s_max: int = 12):
  """Edits `c` (a base config describing the plain same-size MDM) into `variant`; returns c."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
  length, batch = c.data.seq_len, c.train.batch_size
  base = model_config(c)
  loop = _loop_variant(c.copy_and_resolve_references(), block, s_max)
  loop_cfg, loop_dist = model_config(loop), LoopDistribution.parse(loop.loops.train)
  loop_steps = round(flops.matched_steps(loop_cfg, loop_dist, base, None, baseline_steps,
                                         length, batch))
  if variant == "mdm":
    c.train.steps = baseline_steps
  elif variant == "loopmdm":
    _loop_variant(c, block, s_max)
    c.train.steps = loop_steps
  elif variant == "mdm_matched":
    c.train.steps = loop_steps
  elif variant == "deep_mdm":
    _, depth = flops.matched_depth(loop_cfg, loop_dist, length)
    c.model.num_layers = depth
    c.train.steps = loop_steps
  elif variant == "uniform_loop":
    target = loop_cfg.executed_depth(1) + (loop_dist.expected - 1) * loop_cfg.block_layers
    n = base.num_layers
    k = min(range(1, s_max + 1), key=lambda k: abs(n * (k + 1) / 2 - target))
    c.model.loop_start, c.model.loop_end = 0, n
    c.loops.train = f"uniform:1:{k}"
    ucfg, udist = model_config(c), LoopDistribution.parse(c.loops.train)
    c.train.steps = round(flops.matched_steps(ucfg, udist, base, None, baseline_steps, length,
                                              batch))
  return c
