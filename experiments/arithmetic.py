"""Built-in addition ("123+45=" -> "168"): the default experiment, no download.

Hardware and time: 2 CPU cores, a few minutes for the default variant (loopmdm; the time
measured is in the README's quick start). The prompt is never noised or scored; the answer field
is. The model and recipe are those of the earlier arithmetic study (the text study replaced it),
where every model learned the task to ~0.96 exact match: 12 layers of width 32, layers 3-4 looped
S ~ U{1..4} for loopmdm. The run ends with held-out exact match at S = 1, 2, S_max and 2 S_max
and a plot of it (loopjax/evaluate/final.py). Variants (`--config experiments/arithmetic.py:V`,
loopjax/config/variants.py):
  loopmdm       layers [3, 5) looped, S ~ U{1..4}, steps FLOP-matched to mdm   (default)
  mdm           the same 12 layers without looping (same parameters), 3000 steps
  deep_mdm      a plain MDM with LoopMDM's per-step compute, LoopMDM's steps
  uniform_loop  every layer looped, FLOP-matched steps
  mdm_matched   the plain 12-layer MDM for LoopMDM's step count
"""

from loopjax.data.arithmetic import required_seq_len
from loopjax.config.base import base_config

BASELINE_STEPS = 3000
MAX_DIGITS, OPS = 3, "+"


def get_config(variant: str = "loopmdm"):
  c = base_config()
  length = required_seq_len(MAX_DIGITS, OPS)
  c.data.update(source="arithmetic", max_digits=MAX_DIGITS, ops=OPS, seq_len=length)
  c.model.update(max_length=length, width=32, num_layers=12, num_heads=2, cond_dim=16)
  c.train.update(batch_size=64, lr=4e-3, warmup_steps=100, lr_schedule="constant",
                 ema_decay=0.99, log_every=200, checkpoint_every=1000, eval_every=1000,
                 eval_batches=2, eval_time_points=4)
  c.eval.examples = 512
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS, block=(3, 5),
                   s_max=4, flop_convention="all_forward")  # F_base: every forward matmul
  return c
