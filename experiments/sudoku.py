"""Built-in Sudoku (puzzle -> solution): the default experiment, no download.

Hardware and time: 2 CPU cores, a few minutes (default variant). Given cells stay unmasked;
only blanks are noised and scored. Variants (`--config experiments/sudoku.py:VARIANT`):
  loopmdm       4 layers, block = layer 1..2 looped, S ~ U{1..6}      (default)
  mdm           the same 4 layers without looping (same parameters)
  deep_mdm      a plain MDM with the depth of LoopMDM at E[S]
  uniform_loop  every layer looped, S ~ U{1..6}
"""

from loopjax.train.config import base_config

VARIANTS = ("loopmdm", "mdm", "deep_mdm", "uniform_loop")


def get_config(variant: str = "loopmdm"):
  variant = variant or "loopmdm"
  if variant not in VARIANTS:
    raise ValueError(f"experiments/sudoku.py: unknown variant {variant!r}; one of {VARIANTS}")
  c = base_config()
  c.data.source = "sudoku"
  c.data.seq_len = 81
  c.data.min_givens, c.data.max_givens = 36, 50
  c.model.update(vocab_size=9, max_length=81, width=128, num_layers=4, num_heads=4,
                 cond_dim=64, mlp_ratio=4.0)
  if variant == "loopmdm":
    c.model.loop_start, c.model.loop_end = 1, 2
    c.loops.train = "uniform:1:6"
  elif variant == "uniform_loop":
    c.model.loop_start, c.model.loop_end = 0, 4
    c.loops.train = "uniform:1:3"
  elif variant == "deep_mdm":
    c.model.num_layers = 4 + round(1 * (3.5 - 1))  # executed depth of LoopMDM at E[S] = 3.5
  c.train.update(steps=1500, batch_size=32, lr=2e-3, warmup_steps=100, lr_schedule="cosine",
                 ema_decay=0.99, log_every=50, checkpoint_every=500, eval_every=500,
                 eval_batches=2, eval_time_points=4)
  c.eval.examples = 128
  return c
