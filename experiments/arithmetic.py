"""Built-in multi-digit arithmetic with a worked answer (no download).

Hardware and time: 2 CPU cores, ~10 minutes for the default size. The prompt ("123+456=") is
never noised or scored; the answer field is. Variants: mdm, loopmdm, deep_mdm, uniform_loop,
mdm_matched (loopjax/train/variants.py; step counts FLOP-matched by loopjax.flops).
"""

from loopjax.train.config import base_config

BASELINE_STEPS = 3000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  c.data.update(source="arithmetic", max_digits=3, ops="+-", seq_len=16)
  c.model.update(max_length=16, width=128, num_layers=4, num_heads=4, cond_dim=64)
  c.train.update(batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.99, log_every=100,
                 checkpoint_every=1000, eval_every=1000, eval_batches=2, eval_time_points=4)
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS, block=(1, 2),
                   s_max=6, flop_convention="all_forward")  # F_base: every forward matmul
  return c
