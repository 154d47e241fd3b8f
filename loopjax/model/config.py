"""Architecture description of the looped denoiser, validated before anything compiles.

`ModelConfig` is a frozen dataclass so Flax modules can hold it as a static attribute. It is built
from the `model` section of an ml_collections experiment config with `ModelConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from loopjax.model.kernels import KERNELS

# The logit of a padded head column: exp(MASKED_LOGIT - any real logit) is exactly 0 in float32,
# so padded ids get no probability and never win an argmax or a Gumbel/exponential race, while
# staying finite (0 * MASKED_LOGIT is 0, not NaN, in entropies and expectations).
MASKED_LOGIT = -1e9
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
MLP_TYPES = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")
LOOP_WEIGHTS = ("gathered", "per_iteration")
EMBED_INITS = ("normal", "mdlm")
# Fields that change how the same weights are computed, not what they are: a loaded model or a
# resumed run may set them anew (max_loops: the loop count's scan length, not a weight shape,
# unless there is a loop embedding).
RUNTIME_FIELDS = ("max_loops", "kernels", "remat", "loop_remat", "dtype", "scan_unroll",
                  "unroll_layers")
DENSE_INITS = ("lecun_normal", "torch")

log = logging.getLogger(__name__)
_WARNED: set = set()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of the denoiser.

  Layers are split into head `[0, loop_start)`, looped block `[loop_start, loop_end)` and tail
  `[loop_end, num_layers)`. `loop_start == loop_end` means no looped block (a plain MDM).
  The input vocabulary has `vocab_size + 1` ids; id `vocab_size` is `[MASK]`. The head outputs
  `vocab_size` logits, so the mask is never predicted.

  `vocab_multiple` > 1 pads both tables to a multiple of it (`padded_vocab` head columns,
  `input_vocab` embedding rows), so that a mesh axis divides them (and TPU matmul tiles fill):
  a vocabulary no mesh axis divides stays whole on every device, and so do the logits. The
  padded head columns hold MASKED_LOGIT, so they carry no probability and are never sampled;
  padded embedding rows are never looked up (ids stop at the [MASK] id).
  """

  vocab_size: int = 256
  vocab_multiple: int = 1  # 1: no padding (the paper configs in experiments/ set 128)
  max_length: int = 128
  width: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  mlp_type: str = "gelu"
  dropout: float = 0.0
  # Dropout also on the MLP's hidden activation (after the GELU). MDLM's DDiTBlock has none
  # there: only on the attention output and on the MLP output, before their gates.
  mlp_hidden_dropout: bool = True
  # Initialisation (the defaults are the legacy ones; experiments/ paper configs set MDLM's).
  # "normal": N(0, 1) token embedding. "mdlm": U(-1/sqrt(D), 1/sqrt(D)), std 1/sqrt(3 D)
  # (0.0208 at D = 768), as torch's kaiming_uniform_(a=sqrt(5)) on MDLM's (V, D) table
  # (models/dit.py EmbeddingLayer; fan_in = D).
  embed_init: str = "normal"
  # Kernels of the attention, MLP and time-embedding projections. "lecun_normal": N(0, 1/fan_in),
  # zero MLP biases, N(0, 0.02^2) time MLP. "torch": torch nn.Linear's default (MDLM's, which
  # leaves them as constructed), kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  dense_init: str = "lecun_normal"
  zero_init_head: bool = False  # zero output projection, as MDLM's DDitFinalLayer.linear.
  norm_eps: float = 1e-6  # LayerNorm epsilon; MDLM's LayerNorm (torch F.layer_norm) uses 1e-5.
  time_conditioning: bool = False
  cond_dim: int = 128
  loop_start: int = 0
  loop_end: int = 0
  max_loops: int = 1  # S_max: static length of the loop scan; S <= max_loops at run time.
  grad_last_k: int = 0  # >0: gradient only through the last k loop iterations.
  loop_inject: bool = False  # add the head output back at the start of every loop iteration.
  loop_embedding: bool = False  # learned per-iteration embedding added before each iteration.
  dtype: str = "float32"  # compute dtype; parameters stay float32.
  remat: str = "none"  # per-layer policy of the head and tail stacks.
  # Policy around each loop iteration. "full" saves only the carry per iteration; any policy that
  # saves more makes the scan stack those residuals for all S_max iterations (zeros for the
  # skipped ones), so the backward's time and memory then grow with S_max instead of S.
  loop_remat: str = "full"
  # How the looped block's FSDP-sharded weights reach the loop. "gathered": once per step before
  # the loop, their gradient summed over the iterations and reduce-scattered once after it
  # (costs one unsharded copy of the block's weights and of its gradient per device for the
  # step). "per_iteration": gathered inside every iteration (and again in the recompute), the
  # gradient reduce-scattered every iteration: S times the communication, no extra memory.
  loop_weights: str = "gathered"
  # Sequence parallelism: in a tensor-parallel mesh, the residual stream between the attention
  # and MLP blocks split along the length over `tensor` (block outputs reduce-scattered, inputs
  # all-gathered) instead of replicated (block outputs all-reduced). No effect without tensor.
  sequence_parallel: bool = False
  # Kernel set computing the matmuls and attention (loopjax/model/kernels): reference,
  # xla_cpu, cudnn, splash, or auto: chosen from the platform of the devices the step is
  # compiled for by `resolve_kernels` (the train step, `loopjax.load` and the loaders call it)
  # before the model runs; a model applied with `auto` unresolved raises.
  kernels: str = "auto"
  rope_base: float = 10000.0
  # Training loss: the output head's logits and their log-softmax are built this many positions
  # of the length at a time (rematerialised in the backward), never B x L x V at once. >= L
  # (or not dividing L): all at once, as the logits of inference.
  loss_chunk: int = 256
  scan_unroll: bool = False  # unroll layer/loop scans (exact XLA cost analysis; slower compile).
  # Unroll the layer stacks' scans only (never the loop): no stacked per-layer activations,
  # 1.4x faster f32 steps on CPU at the reference config; compile time grows with depth.
  unroll_layers: bool = False

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"model: unknown config field(s) {unknown}; known fields: {sorted(names)}")
    cfg = cls(**dict(d))
    cfg.validate()
    return cfg

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @property
  def padded_vocab(self) -> int:
    """Columns of the output head: vocab_size rounded up to a multiple of vocab_multiple."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def input_vocab(self) -> int:
    """Rows of the token embedding: vocab_size + 1 ([MASK]) rounded up the same way."""
    return -(-(self.vocab_size + 1) // self.vocab_multiple) * self.vocab_multiple

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(round(self.width * self.mlp_ratio))

  @property
  def looped(self) -> bool:
    return self.loop_end > self.loop_start

  @property
  def block_layers(self) -> int:
    return self.loop_end - self.loop_start

  def executed_depth(self, loops: int) -> int:
    """Number of transformer layers executed for `loops` iterations of the block."""
    return self.num_layers + self.block_layers * (loops - 1) if self.looped else self.num_layers

  def validate(self) -> None:
    def bad(field, msg):
      raise ValueError(f"model.{field}: {msg}")

    for field in ("vocab_size", "vocab_multiple", "max_length", "width", "num_layers",
                  "num_heads", "cond_dim"):
      if int(getattr(self, field)) < 1:
        bad(field, f"must be >= 1, got {getattr(self, field)}")
    if self.width % self.num_heads:
      bad("num_heads", f"{self.num_heads} heads do not divide width {self.width}")
    if self.head_dim % 2:
      bad("num_heads", f"head dim {self.head_dim} must be even for RoPE")
    if not 0 <= self.loop_start <= self.loop_end <= self.num_layers:
      bad("loop_start", f"looped block [{self.loop_start}, {self.loop_end}) must lie inside "
          f"[0, {self.num_layers}] with loop_start <= loop_end")
    if self.max_loops < 1:
      bad("max_loops", f"S_max must be >= 1, got {self.max_loops}")
    if self.grad_last_k < 0:
      bad("grad_last_k", f"must be >= 0, got {self.grad_last_k}")
    if not 0.0 <= self.dropout < 1.0:
      bad("dropout", f"must be in [0, 1), got {self.dropout}")
    if self.loss_chunk < 0:
      bad("loss_chunk", f"must be >= 0 (0: no chunking), got {self.loss_chunk}")
    if self.mlp_ratio <= 0:
      bad("mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
    if not 0.0 < self.norm_eps < 1.0:
      bad("norm_eps", f"must be in (0, 1), got {self.norm_eps}")
    for field, allowed in (("mlp_type", MLP_TYPES), ("embed_init", EMBED_INITS),
                           ("dense_init", DENSE_INITS), ("remat", REMAT_POLICIES),
                           ("loop_remat", REMAT_POLICIES), ("loop_weights", LOOP_WEIGHTS),
                           ("kernels", KERNELS), ("dtype", DTYPES)):
      if getattr(self, field) not in allowed:
        bad(field, f"{getattr(self, field)!r} is not one of {allowed}")
    self._warn_cut_gradient()

  def _warn_cut_gradient(self) -> None:
    """Warns (once per setting) when grad_last_k leaves the embedding and head without gradient."""
    if not (self.looped and 0 < self.grad_last_k < self.max_loops and not self.loop_inject):
      return
    key = (self.grad_last_k, self.max_loops, self.loop_start)
    if key in _WARNED:
      return
    _WARNED.add(key)
    log.warning(
        "model.grad_last_k=%d without model.loop_inject: whenever S > %d the gradient is cut "
        "at the input of iteration S-%d, so the token embedding and the head layers [0, %d) get "
        "exactly zero gradient on those steps (S_max = %d); set model.loop_inject=True to "
        "re-inject the head output after the cut", self.grad_last_k, self.grad_last_k,
        self.grad_last_k, self.loop_start, self.max_loops)
