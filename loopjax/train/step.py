"""The train and eval steps, and the one place that builds the sharded, jitted train step.

Per step, from `fold_in(state.rng, step)`: the loop count S (one for the whole global batch),
antithetic times, the forward masking and dropout. The update is skipped (state unchanged but
the step counter) when the loss or gradient is not finite; the trainer decides whether that is
an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from loopjax import ema as ema_lib
from loopjax.diffusion import (Schedule, make_schedule, mask_tokens, nelbo_on_grid,
                               nelbo_terms, sample_times)
from loopjax.model import LoopedTransformer, resolve_kernels
from loopjax.parallel import mesh as mesh_lib
from loopjax.config import from_config
from loopjax.loops import LoopDistribution
from loopjax.train.state import (TrainState, create_abstract_state, init_state, learning_rate,
                                 make_optimizer)

# The batch format's arrays (loopjax/data/batch.py), each [B, L].
BATCH_DTYPES = {"tokens": jnp.int32, "fixed": jnp.bool_, "loss_mask": jnp.bool_,
                "segment_ids": jnp.int32}


def make_train_step(model: LoopedTransformer, tx: optax.GradientTransformation,
                    schedule: Schedule, loop_dist: LoopDistribution, *, antithetic: bool,
                    ema_decay: float, grad_accum: int, lr_fn, ema_warmup: bool = False):
  mask_id = model.cfg.mask_id

  def micro_grads(params, batch, rngs, loops):
    r_t, r_mask, r_drop = rngs
    tokens = batch["tokens"]
    t_B = sample_times(r_t, tokens.shape[0], antithetic=antithetic, eps=schedule.eps)
    x_t, masked = mask_tokens(r_mask, tokens, schedule.alpha(t_B), mask_id, batch["fixed"])

    def nelbo_sum(p):
      # The model returns the clean tokens' NLLs: its head never holds B x L x V logits.
      nll = model.apply({"params": p}, x_t, loops, t_B, batch["segment_ids"], train=True,
                        rngs={"dropout": r_drop}, targets_BxL=tokens)
      out = nelbo_terms(nll, masked, t_B, schedule, batch["loss_mask"])
      return out["nelbo_sum"], out

    return jax.grad(nelbo_sum, has_aux=True)(params)

  def train_step(state: TrainState, batch, loops=None):
    """One optimizer step; `loops` (int32 scalar) overrides the drawn S (benchmarks, tests)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    r_loops, r_t, r_mask, r_drop = jax.random.split(rng, 4)
    if loops is None:
      loops = loop_dist.sample(r_loops)
    if grad_accum == 1:
      grads, out = micro_grads(state.params, batch, (r_t, r_mask, r_drop), loops)
      nelbo, tokens, masked_frac = out["nelbo_sum"], out["num_tokens"], out["masked_fraction"]
    else:
      # Micro-batch i is rows i, i + k, i + 2k, ... (k = grad_accum): every device's block of
      # the data-sharded batch holds its share of every micro-batch, so each micro-step stays
      # data-parallel (contiguous row blocks would put a micro-batch on 1/k of the devices).
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1),
          batch)

      def body(acc, i_batch):
        i, mb = i_batch
        rngs = tuple(jax.random.fold_in(r, i) for r in (r_t, r_mask, r_drop))
        g, out = micro_grads(state.params, mb, rngs, loops)
        acc = jax.tree_util.tree_map(jnp.add, acc, (g, out["nelbo_sum"], out["num_tokens"],
                                                    out["masked_fraction"]))
        return acc, None

      zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params), 0.0, 0.0, 0.0)
      (grads, nelbo, tokens, masked_frac), _ = jax.lax.scan(
          body, zeros, (jnp.arange(grad_accum), micro))
      masked_frac = masked_frac / grad_accum
    # The loss is NELBO nats per scored token over the whole global batch.
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    loss = nelbo / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      d = ema_lib.decay_at(state.step + 1, ema_decay, ema_warmup)
      ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
      return params, ema, opt_state

    # A conditional, not a select over the whole state: a skipped update costs nothing and a
    # normal one makes no extra pass over params, EMA and optimizer state.
    params, ema, opt_state = jax.lax.cond(
        finite, update, lambda _: (state.params, state.ema_params, state.opt_state), None)
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    metrics = dict(loss=loss, bits_per_token=loss / jnp.log(2.0), loops=loops,
                   grad_norm=grad_norm, lr=lr_fn(state.step), finite=finite,
                   masked_fraction=masked_frac, scored_tokens=tokens)
    return new, metrics

  return train_step


def all_finite(tree) -> jax.Array:
  """Whether every element of every array in `tree` is finite (a bool scalar)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
      else jnp.bool_(True)


def make_eval_step(model: LoopedTransformer, schedule: Schedule, grid):
  """Held-out NELBO sums on a fixed time grid (low variance), at a given S."""
  mask_id = model.cfg.mask_id

  def eval_step(params, batch, loops, rng):
    logits_fn = lambda x_t, t_B: model.apply({"params": params}, x_t, loops, t_B,
                                             batch["segment_ids"])
    out = nelbo_on_grid(logits_fn, rng, batch["tokens"], schedule, mask_id, grid,
                        fixed=batch["fixed"], loss_mask=batch["loss_mask"])
    return {"nelbo_sum": out["nelbo_sum"], "num_tokens": out["num_tokens"]}

  return eval_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """One config's train step on one mesh: the model, the optimizer, the sharded jitted step
  (state donated) and the shapes and shardings of what it takes.

  `step(state, batch)` draws S from `loops.train`; `step_at_loops(state, batch, loops)` takes S
  as an int32 scalar (benchmarks). Both map (state, batch) onto (state, replicated metrics)."""
  model: LoopedTransformer
  tx: optax.GradientTransformation
  mesh: Mesh
  abstract_state: TrainState  # jax.ShapeDtypeStruct leaves that carry their shardings
  state_shardings: Any
  batch_sharding: NamedSharding
  step: Callable
  step_at_loops: Callable
  batch_size: int
  seq_len: int
  seed: int

  def init_state(self) -> TrainState:
    """A fresh state (train.seed), initialised directly into its shardings."""
    example = jnp.zeros((1, self.seq_len), jnp.int32)
    return init_state(self.model, self.tx, example, self.seed, self.state_shardings)

  def abstract_batch(self) -> dict:
    """The global batch as jax.ShapeDtypeStructs with the batch sharding (for AOT lowering)."""
    return {k: jax.ShapeDtypeStruct((self.batch_size, self.seq_len), dt,
                                    sharding=self.batch_sharding)
            for k, dt in BATCH_DTYPES.items()}


def build_train_step(config, mesh: Mesh) -> TrainProgram:
  """The train step of a run (a loopjax.config Run, or a config resolved into one here) on
  `mesh`, sharded and jitted (nothing compiled).

  The model's kernels are resolved for the mesh's devices, so an AOT compile for a topology
  other than this host's gets that topology's kernels."""
  run = from_config(config)
  model_cfg, loop_dist, config = run.model, run.loops, run.config
  t = config.train
  batch_size, seq_len = int(t.batch_size), int(config.data.seq_len)
  mesh_lib.check_batch_divisible(mesh, batch_size, int(t.grad_accum))
  cfg = resolve_kernels(model_cfg, list(mesh.devices.flat))
  model, tx = LoopedTransformer(cfg), make_optimizer(t)
  example = jnp.zeros((1, seq_len), jnp.int32)
  abstract, shardings = create_abstract_state(model, tx, example, int(t.seed), mesh)
  fn = make_train_step(model, tx, make_schedule(config.diffusion),
                       loop_dist,
                       antithetic=config.diffusion.antithetic, ema_decay=t.ema_decay,
                       grad_accum=int(t.grad_accum), lr_fn=learning_rate(t),
                       ema_warmup=bool(t.get("ema_warmup", False)))
  batch_sh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  # Traced under the mesh's logical-axis rules: activations shard over the batch axes.
  jit = lambda *in_sh: jax.jit(mesh_lib.with_rules(fn, mesh), in_shardings=in_sh,
                               out_shardings=(shardings, rep), donate_argnums=0)
  return TrainProgram(model=model, tx=tx, mesh=mesh, abstract_state=abstract,
                      state_shardings=shardings, batch_sharding=batch_sh,
                      step=jit(shardings, batch_sh), step_at_loops=jit(shardings, batch_sh, rep),
                      batch_size=batch_size, seq_len=seq_len, seed=int(t.seed))
