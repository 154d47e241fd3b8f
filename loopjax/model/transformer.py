"""The looped MDLM denoiser: head stack, weight-shared looped block, tail stack, output head.

    h = head(embed(x_t));  h = block(h) repeated S times (one set of weights);  logits = tail(h)

`S` (`loops`) may be a traced integer: the loop is an `nn.scan` of static length `max_loops` whose
body runs the block under `nn.cond(i < S)`, so one compiled program serves every S <= S_max and
its cost follows S. Any S runs S loops: the iterations past S_max follow the scan
(`extra_loops`). The plain MDM, the deeper MDM and uniform looping are configurations of this
one module (no looped block; more layers; block = every layer).

The same code returns, on request, the hidden state after every loop iteration and the attention
probabilities of every layer (`collect=True`), used by adaptive loops and the attention analysis.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from loopjax.diffusion.nelbo import chunked_token_nll
from loopjax.model import kernels as kernels_lib
from loopjax.model.config import MASKED_LOGIT, ModelConfig
from loopjax.model.kernels.masks import AttentionMask
from loopjax.model.layers import (Block, Dense, adaln_modulation, bias_init, compute_dtype,
                                  constrain, dense_init, kernel_initializer, layer_norm,
                                  stream_axes)
from loopjax.parallel import mesh as mesh_lib

Array = jax.Array

# `Loop(loops=RUN_ALL)`: every iteration of the chunk runs (no conditional per iteration).
RUN_ALL = "all"

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def _block_class(cfg: ModelConfig, remat: bool = True):
  if cfg.remat == "none" or not remat:
    return Block
  # Block(x, c, mask, train, return_probs): train and return_probs are Python flags.
  return nn.remat(Block, policy=_REMAT[cfg.remat], prevent_cse=False, static_argnums=(4, 5))


class _ScanLayer(nn.Module):
  """Block with the (carry, *broadcast) -> (carry, ys) signature nn.scan wants."""

  cfg: ModelConfig
  train: bool
  collect: bool
  remat: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, c_BxC, mask):
    return _block_class(self.cfg, self.remat)(self.cfg, name="layer")(
        x_BxLxD, c_BxC, mask, self.train, self.collect)


class Stack(nn.Module):
  """`num` distinct layers with parameters stacked on a leading `layers` axis (one nn.scan)."""

  cfg: ModelConfig
  num: int
  remat: bool = True  # remat each layer per cfg.remat (False: the caller remats around it)

  @nn.compact
  def __call__(self, x_BxLxD, c_BxC, mask, train: bool = False, collect: bool = False):
    scan = nn.scan(_ScanLayer, variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast, nn.broadcast), length=self.num,
                   metadata_params={nn.PARTITION_NAME: "layers"},
                   unroll=True if self.cfg.scan_unroll or self.cfg.unroll_layers else 1)
    return scan(self.cfg, train, collect, self.remat, name="scan")(x_BxLxD, c_BxC, mask)


class _LoopIteration(nn.Module):
  """One loop iteration: the shared block when i < S, else h passes through unchanged.

  The carry is h alone: h0, S, c and the mask are loop-invariant (scan broadcasts), so the
  scan stacks one B x L x D carry per iteration for the backward, in the stream dtype."""

  cfg: ModelConfig
  train: bool
  collect: bool
  static_full: bool  # S == number of iterations is known statically: no conditional needed.

  @nn.compact
  def __call__(self, h_BxLxD, i, h0_BxLxD, loops, c_BxC, mask):
    cfg = self.cfg
    h_in = h_BxLxD
    if cfg.grad_last_k > 0:
      # Iterations before S - k get no gradient: cut the graph where iteration S - k starts
      # (never at iteration 0, whose input is the head's output).
      h_in = jnp.where((i > 0) & (i == loops - cfg.grad_last_k), jax.lax.stop_gradient(h_in), h_in)
    if cfg.loop_inject:
      h_in = h_in + h0_BxLxD
    if cfg.loop_embedding:
      table = self.param("loop_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("loops", "embed")), (cfg.max_loops, cfg.width))
      h_in = (h_in + table[jnp.minimum(i, cfg.max_loops - 1)][None, None, :]).astype(
          h_BxLxD.dtype)

    def run(mdl, h):
      # Remat (if any) is applied around the whole iteration (see Loop), not per layer.
      return Stack(cfg, cfg.block_layers, remat=False, name="block")(
          h, c_BxC, mask, self.train, self.collect)

    def skip(mdl, h):
      probs = None
      if self.collect:
        b, length = h.shape[:2]
        probs = jnp.zeros((cfg.block_layers, b, cfg.num_heads, length, length), jnp.float32)
      return h_BxLxD, probs

    if self.is_initializing() or self.static_full:
      h_out, probs = run(self, h_in)
    else:
      h_out, probs = nn.cond(i < loops, run, skip, self, h_in)
    return h_out, ((h_out, probs) if self.collect else None)


class Loop(nn.Module):
  """The looped block: one copy of its weights, applied `loops` times (traced or static)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxLxD, c_BxC, mask, loops, train: bool = False,
               collect: bool = False, start: Any = 0, length: int | None = None,
               h0_BxLxD: Array | None = None):
    """Runs iterations start .. start+length-1 (default all S_max), the first `loops` of them.

    `loops` is S (int or traced), or RUN_ALL: every iteration of the chunk runs, statically.
    Returns (h, ys); ys = (hidden after each iteration, attention probs) when `collect`.
    `h0` is the head output re-injected by `loop_inject` (default: the input h).
    """
    cfg = self.cfg
    length = cfg.max_loops if length is None else length
    if isinstance(loops, str) and loops == RUN_ALL:
      static_full, loops = True, start + length  # S: the iterations done by the chunk's end
    else:
      static_full = isinstance(loops, int) and isinstance(start, int) and loops >= start + length
    # Remat wraps the whole iteration (the nn.cond and the block): its saved inputs are then
    # the carry and loop-invariant weights, which the scan keeps once. Remat per layer inside
    # the cond would make the per-layer weight slices residuals of the cond, and the scan would
    # stack a copy of the block's weights for every one of the S_max iterations. Without it
    # (loop_remat="none") the cond's skip branch writes zero residuals for every skipped
    # iteration: a cost that follows S_max, not S.
    body = _LoopIteration if cfg.loop_remat == "none" else nn.remat(
        _LoopIteration, policy=_REMAT[cfg.loop_remat], prevent_cse=False)
    scan = nn.scan(body, variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True},
                   in_axes=(0,) + (nn.broadcast,) * 4, length=length,
                   unroll=length if cfg.scan_unroll else 1)
    iters = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    h0_BxLxD = h_BxLxD if h0_BxLxD is None else h0_BxLxD
    args = (h_BxLxD, iters, h0_BxLxD, jnp.asarray(loops, jnp.int32), c_BxC, mask)
    if cfg.loop_weights != "gathered" or self.is_initializing():
      return scan(cfg, train, collect, static_full, name="scan")(*args)
    groups, axes = (1, ()) if collect else mesh_lib.loop_groups(h_BxLxD.shape[0])
    gather = _gather_fn(cfg, body, args, groups)
    if groups == 1:
      return nn.map_variables(scan, "params", trans_in_fn=gather)(
          cfg, train, collect, static_full, name="scan")(*args)
    # One copy of the gathered weights per data-parallel block of the batch, each block's
    # iterations vmapped over: a copy's gradient is that block's alone, so it is summed over
    # the iterations on its own device and reduced across devices once, after the loop (one
    # shared copy would be all-reduced in every iteration, inside the cond).
    split = lambda x: x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
    vmapped = nn.vmap(scan, variable_axes={"params": 0}, split_rngs={"params": False,
                                                                     "dropout": True},
                      in_axes=(0, None, 0, None, 0, 0), out_axes=0, axis_size=groups,
                      spmd_axis_name=axes)
    h_GxBxLxD = constrain(split(h_BxLxD), "loop_group", None, *stream_axes(cfg)[1:])
    grouped = (h_GxBxLxD, iters, split(h0_BxLxD), args[3], split(c_BxC),
               jax.tree_util.tree_map(split, mask))
    with mesh_lib.per_group_rules():
      h_GxBxLxD, _ = nn.map_variables(vmapped, "params", trans_in_fn=gather)(
          cfg, train, collect, static_full, name="scan")(*grouped)
    return constrain(h_GxBxLxD.reshape(h_BxLxD.shape), *stream_axes(cfg)), None


def _gather_fn(cfg: ModelConfig, body, args, groups: int):
  """The looped block's parameters with their FSDP-sharded dimensions made whole (tensor
  sharding kept), applied once before the loop: the scan then takes the gathered weights as
  loop-invariant inputs, and the transpose of the constraint reduce-scatters their gradient,
  accumulated over the iterations, once after the loop. `groups` > 1: that many copies on a
  leading axis sharded like the batch."""
  def init(*xs):
    return body(cfg, False, False, True, parent=None).init(
        {"params": jax.random.PRNGKey(0)}, xs[0], xs[1][0], *xs[2:])
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  specs = nn.get_partition_spec(jax.eval_shape(init, *shapes))["params"]

  def one(spec, x):
    axes = mesh_lib.gathered_axes(tuple(spec))
    x = nn.with_logical_constraint(x, axes)
    if groups == 1:
      return x
    return nn.with_logical_constraint(jnp.broadcast_to(x, (groups,) + x.shape),
                                      ("loop_group",) + axes)

  def gather(variables):
    return {"params": jax.tree_util.tree_map(one, specs, variables["params"],
                                             is_leaf=lambda x: isinstance(x, P))}
  return gather


def embedding_initializer(kind: str):
  """Token table V x D: "normal" N(0, 1), or "mdlm" U(-1/sqrt(D), 1/sqrt(D)) (torch's
  kaiming_uniform_(a=sqrt(5)) on a (V, D) tensor takes fan_in = D, the last axis)."""
  if kind == "mdlm":
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1,
                                            out_axis=-2)
  return nn.initializers.normal(1.0)


class Embed(nn.Embed):
  """nn.Embed whose lookup gathers the (FSDP-sharded) table, as every layer gathers its weights,
  instead of gathering the batch's token ids onto every device."""

  def __call__(self, tokens_BxL):
    table_VxD = nn.with_logical_constraint(self.embedding, ("act_vocab", None))
    tokens_BxL = nn.with_logical_constraint(tokens_BxL, ("act_batch", "act_length"))
    return jnp.take(table_VxD, tokens_BxL, axis=0)


class TimeEmbedding(nn.Module):
  """Sinusoidal features of t -> MLP -> SiLU, as MDLM's TimestepEmbedder."""

  cond_dim: int
  freq_dim: int = 256
  init_kind: str = "lecun_normal"  # ModelConfig.dense_init; "lecun_normal" here: N(0, 0.02^2)

  @nn.compact
  def __call__(self, t_B):
    half = self.freq_dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t_B.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    torch = self.init_kind == "torch"
    kernel = kernel_initializer("torch") if torch else nn.initializers.normal(0.02)
    init = lambda axes: nn.with_logical_partitioning(kernel, axes)
    dense = lambda fan_in, name: nn.Dense(self.cond_dim, kernel_init=init((None, "cond")),
                                          bias_init=bias_init(fan_in, self.init_kind), name=name)
    emb = dense(self.freq_dim, "fc1")(emb)
    emb = dense(self.cond_dim, "fc2")(nn.silu(emb))
    return nn.silu(emb)


class _HeadParams(nn.Module):
  """The output projection's kernel D x V and bias V (nn.Dense's names, shapes and inits)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, d: int):
    cfg = self.cfg
    kernel_init = (nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab"))
                   if cfg.zero_init_head else dense_init(("embed", "vocab"), kind=cfg.dense_init))
    kernel = self.param("kernel", kernel_init, (d, cfg.padded_vocab))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (cfg.padded_vocab,))
    return kernel, bias


class OutputLayer(nn.Module):
  """Final adaLN-modulated norm and the untied head producing V logits (no [MASK] output),
  padded to cfg.padded_vocab columns whose logits are MASKED_LOGIT."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxLxD, c_BxC, targets_BxL=None):
    """Logits B x L x padded V (float32); with `targets_BxL`, their NLL B x L (float32) instead,
    computed model.loss_chunk positions at a time (`chunked_token_nll`)."""
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    ops = kernels_lib.get(cfg.kernels)
    shift, scale = adaln_modulation(c_BxC, 2, cfg.width, "adaln")
    h = layer_norm(dt, "norm", cfg.norm_eps)(h_BxLxD) * (1 + scale) + shift
    # Whole length from here (gathered once from the sequence-parallel stream): the head's
    # chunks split the length, the vocabulary is split over tensor.
    h = constrain(h, "act_batch", "act_length", "act_embed")
    kernel, bias = _HeadParams(cfg, name="proj")(h.shape[-1])
    # The head's weight gathered over the embedding (FSDP) once, outside the chunks' loop: each
    # chunk reads this copy, and the weight's gradient is summed over the chunks (in the
    # parameter dtype) and reduced once after them, not gathered and reduced per chunk.
    kernel_DxV = constrain(kernel, None, "act_vocab")

    def logits_fn(h_BxCxD):
      y = ops.dot_general(h_BxCxD.astype(dt), kernel_DxV.astype(dt), (((2,), (0,)), ((), ())))
      logits = constrain(ops.add_bias(y, bias).astype(jnp.float32),
                         "act_batch", "act_length", "act_vocab")
      if cfg.padded_vocab > cfg.vocab_size:  # padded columns: no probability (ModelConfig)
        real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
        logits = jnp.where(real, logits, MASKED_LOGIT)
      return logits

    if targets_BxL is None:
      return logits_fn(h)
    return chunked_token_nll(logits_fn, h, targets_BxL, cfg.loss_chunk)


class LoopedTransformer(nn.Module):
  """MDLM-style bidirectional denoiser with an optional weight-shared looped block."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = Embed(cfg.input_vocab, cfg.width, embedding_init=nn.with_logical_partitioning(
        embedding_initializer(cfg.embed_init), ("vocab", "embed")))
    self.time_embed = TimeEmbedding(cfg.cond_dim, init_kind=cfg.dense_init)
    head_n = cfg.loop_start if cfg.looped else cfg.num_layers
    tail_n = cfg.num_layers - cfg.loop_end if cfg.looped else 0
    self.head = Stack(cfg, head_n) if head_n else None
    self.loop = Loop(cfg) if cfg.looped else None
    self.tail = Stack(cfg, tail_n) if tail_n else None
    self.output = OutputLayer(cfg)

  def __call__(self, tokens_BxL: Array, loops: Any = 1, t_B: Array | None = None,
               segment_ids_BxL: Array | None = None, *, train: bool = False,
               collect: bool = False, targets_BxL: Array | None = None):
    """Logits B x L x cfg.padded_vocab (float32; the padded columns hold MASKED_LOGIT), or
    (logits, aux) when `collect`. With `targets_BxL` (training): -log p(target) per position,
    float32 B x L, in place of the logits, which are then built model.loss_chunk positions at a
    time and never whole.

    `loops` is S >= 1, a Python int or a traced int32 scalar; either runs S loops, S > max_loops
    included (see `extra_loops`). aux: `loop_hiddens_SxBxLxD` (hidden state after each of the
    first S_max iterations; iterations >= S repeat the last one) and `attn` with layers x B x H x
    L x L probabilities per stack (`head`, `loop` with a leading S_max axis, zeros for
    iterations >= S, `tail`).
    """
    if isinstance(loops, int) and self.cfg.looped and loops < 1:
      raise ValueError(f"loops={loops}: the looped block needs S >= 1 (pass loops=1 or more)")
    h, c, mask, head_probs = self.encode(tokens_BxL, t_B, segment_ids_BxL, train=train,
                                         collect=collect)
    aux = {"attn": {"head": head_probs, "loop": None, "tail": None}}
    if self.loop is not None:
      h0 = h
      h, ys = self.loop(h, c, mask, loops, train, collect)
      if collect:
        aux["loop_hiddens_SxBxLxD"], aux["attn"]["loop"] = ys
      h = self.extra_loops(h, h0, c, mask, loops, train)
    logits, aux["attn"]["tail"] = self.decode(h, c, mask, train=train, collect=collect,
                                              targets_BxL=targets_BxL)
    return (logits, aux) if collect else logits

  # encode / loop_chunk / decode are the same pieces `__call__` uses, callable on their own
  # through `model.apply(params, ..., method=...)` by samplers that drive the loop themselves.

  def encode(self, tokens_BxL, t_B=None, segment_ids_BxL=None, *, train=False, collect=False):
    """Embedding + head layers. Returns (h, c, attention mask (an AttentionMask), head
    attention probs)."""
    cfg = self.cfg
    if tokens_BxL.shape[1] > cfg.max_length:
      raise ValueError(f"sequence length {tokens_BxL.shape[1]} exceeds model.max_length "
                       f"{cfg.max_length}")
    b, length = tokens_BxL.shape
    if not cfg.time_conditioning or t_B is None:
      t_B = jnp.zeros((b,), jnp.float32)  # MDLM feeds a constant when conditioning is off.
    c_BxC = self.time_embed(t_B)
    # Document masking from the segment ids (padding, segment 0, attends only to itself).
    mask = AttentionMask.from_segment_ids(segment_ids_BxL, b, length)
    # The residual stream is in the compute dtype (norm statistics, softmax and loss stay f32).
    h = constrain(self.embed(tokens_BxL).astype(compute_dtype(cfg)), *stream_axes(cfg))
    probs = None
    if self.head is not None:
      h, probs = self.head(h, c_BxC, mask, train, collect)
    return h, c_BxC, mask, probs

  def loop_chunk(self, h_BxLxD, h0_BxLxD, c_BxC, mask, start, length: int):
    """Iterations start .. start+length-1 of the looped block, all executed (inference)."""
    if self.loop is None:
      return h_BxLxD
    h, _ = self.loop(h_BxLxD, c_BxC, mask, RUN_ALL, False, False, start, length,
                     h0_BxLxD)
    return h

  def run_loop(self, h_BxLxD, c_BxC, mask, loops):
    """The looped block applied S = `loops` times (int or traced, any S >= 1) to the head's
    output `h`, as `__call__` does at inference."""
    if self.loop is None:
      return h_BxLxD
    h, _ = self.loop(h_BxLxD, c_BxC, mask, loops, False, False)
    return self.extra_loops(h, h_BxLxD, c_BxC, mask, loops, False)

  def extra_loops(self, h_BxLxD, h0_BxLxD, c_BxC, mask, loops, train: bool):
    """Iterations S_max .. S-1 of the looped block, after the S_max-long scan.

    A Python S runs them as a second static chunk (differentiable). A traced S runs them in a
    `while_loop` that executes zero iterations when S <= S_max, built only outside training:
    reverse-mode differentiation needs a static trip count, and training draws S <= S_max
    (its distribution defines S_max), so the training step keeps its one scan and its cost.
    """
    s_max = self.cfg.max_loops
    if isinstance(loops, int):
      if loops <= s_max or self.is_initializing():
        return h_BxLxD
      h, _ = self.loop(h_BxLxD, c_BxC, mask, RUN_ALL, train, False, s_max, loops - s_max,
                       h0_BxLxD)
      return h
    if train or self.is_initializing():
      return h_BxLxD
    loops = jnp.asarray(loops, jnp.int32)

    def more(mdl, carry):
      return carry[0] < loops

    def one(mdl, carry):
      i, h = carry
      h, _ = mdl.loop(h, c_BxC, mask, RUN_ALL, False, False, i, 1, h0_BxLxD)
      return i + 1, h

    _, h = nn.while_loop(more, one, self, (jnp.int32(s_max), h_BxLxD))
    return h

  def decode(self, h_BxLxD, c_BxC, mask, *, train=False, collect=False, targets_BxL=None):
    """Tail layers, final norm and output head. Returns (logits, tail attention probs), or
    (target NLLs, probs) with `targets_BxL` (see __call__)."""
    probs = None
    if self.tail is not None:
      h_BxLxD, probs = self.tail(h_BxLxD, c_BxC, mask, train, collect)
    return self.output(h_BxLxD, c_BxC, targets_BxL), probs
