"""Built-in Sudoku (puzzle -> solution), no download.

Hardware and time: 2 CPU cores, about 5 minutes for the default variant (loopmdm), which ends
near held-out cell accuracy 0.24 (chance 0.11) and no solved board: the model and budget are too
small to learn it (experiments/arithmetic.py, the default experiment, is learned). Given cells
stay unmasked; only blanks are noised and scored. The paper uses Sudoku to show what later loops
repair. Variants (`--config experiments/sudoku.py:VARIANT`, loopjax/config/variants.py):
  loopmdm       4 layers, layer 1 looped, S ~ U{1..6}, steps FLOP-matched to mdm   (default)
  mdm           the same 4 layers without looping (same parameters), 1000 steps
  deep_mdm      a plain MDM with LoopMDM's per-step compute, LoopMDM's steps
  uniform_loop  every layer looped, FLOP-matched steps
  mdm_matched   the plain 4-layer MDM for LoopMDM's step count
"""

from loopjax.config.base import base_config

BASELINE_STEPS = 1000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  c.data.update(source="sudoku", seq_len=81, min_givens=36, max_givens=50)
  c.model.update(max_length=81, width=64, num_layers=4, num_heads=4, cond_dim=32)
  c.train.update(batch_size=32, lr=3e-3, warmup_steps=100, lr_schedule="cosine",
                 ema_decay=0.99, log_every=50, checkpoint_every=500, eval_every=500,
                 eval_batches=2, eval_time_points=4)
  c.eval.examples = 128
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS, block=(1, 2),
                   s_max=6, flop_convention="all_forward")  # F_base: every forward matmul
  return c
