"""The looped denoiser (model knows nothing of data or training)."""

from loopjax.model.config import ModelConfig
from loopjax.model.kernels import KERNELS, resolve_kernels
from loopjax.model.transformer import LoopedTransformer


def count_params(params) -> int:
  """Number of scalar parameters in a (possibly boxed) parameter tree."""
  import flax.linen as nn
  import jax
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.unbox(params)))


__all__ = ["KERNELS", "ModelConfig", "LoopedTransformer", "count_params",
           "resolve_kernels"]
