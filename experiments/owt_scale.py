"""OpenWebText at ~1B and ~7B parameters: the paper's LoopMDM recipe on larger backbones.

Shapes follow common decoder sizes: ~1B = 2048 wide x 16 layers x 16 heads (head dim 128),
~7B = 4096 x 32 x 32 (LLaMA-7B's width, depth and heads), both with the 4x GELU MLP of the
paper's backbone. The looped block sits where the paper's does, right after the first layer,
and spans the paper's share of the depth (2 of 12 layers): [1, 1 + round(n / 6)), so
[1, 4) at 16 layers and [1, 6) at 32. Everything else is the 170M recipe of experiments/owt.py
(length 1024, batch 512, S ~ U{1..12}, bf16, remat dots_no_batch).

    loopjax memory --config experiments/owt_scale.py:loopmdm_1b --topology v5p:2x4x4 \\
        --mesh fsdp=32                                   # v5p-64: 32 chips
    loopjax memory --config experiments/owt_scale.py:loopmdm_7b --topology v5p:4x4x4 \\
        --mesh fsdp=64                                   # v5p-128: 64 chips

Variants: `<variant>_<size>` with variant one of loopjax/config/variants.py's (mdm, loopmdm,
deep_mdm, uniform_loop, mdm_matched) and size 1b or 7b.
"""

import importlib.util
import os

# The sibling experiment file, by path: experiment files are loaded by path, not as a package.
_spec = importlib.util.spec_from_file_location(
    "owt", os.path.join(os.path.dirname(os.path.abspath(__file__)), "owt.py"))
owt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(owt)

SIZES = {  # size: (width, layers, heads)
    "1b": (2048, 16, 16),
    "7b": (4096, 32, 32),
}


def get_config(arg: str = "loopmdm_1b"):
  variant, _, size = (arg or "loopmdm_1b").rpartition("_")
  if size not in SIZES or not variant:
    raise ValueError(f"experiments/owt_scale.py: variant {arg!r} must be <variant>_<size> with "
                     f"size one of {', '.join(SIZES)} (e.g. loopmdm_1b, mdm_7b)")
  width, layers, heads = SIZES[size]
  c = owt.get_config(variant)
  c.model.update(width=width, num_layers=layers, num_heads=heads)
  c.variant.block = (1, 1 + round(layers / 6))
  return c
