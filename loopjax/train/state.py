"""Train state, optimizer and its sharded creation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from loopjax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: the base key every step folds its step number into


def learning_rate(train_cfg) -> optax.Schedule:
  t = train_cfg
  warmup = min(int(t.warmup_steps), int(t.steps))
  if t.lr_schedule == "constant":
    decay = optax.constant_schedule(t.lr)
  else:
    decay = optax.cosine_decay_schedule(t.lr, max(int(t.steps) - warmup, 1), alpha=t.min_lr_ratio)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warmup), decay], [warmup])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  t = train_cfg
  # Only matrices decay (kernels, embeddings); norm scales and biases do not.
  # (Paths may end in a Partitioned box's `value`: look at the last dict key.)
  def is_matrix(path, _):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(keys) and keys[-1] in ("kernel", "embedding")

  decay_mask = lambda params: jax.tree_util.tree_map_with_path(is_matrix, params)
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm) if t.clip_norm > 0 else optax.identity(),
      optax.adamw(learning_rate(t), b1=t.b1, b2=t.b2, eps=t.adam_eps,
                  weight_decay=t.weight_decay, mask=decay_mask))


def _init_fn(model, tx, example_tokens):
  def init(rng):
    params = model.init(rng, example_tokens, 1)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(rng, 1)))
  return init


def create_abstract_state(model: nn.Module, tx: optax.GradientTransformation, example_tokens,
                          seed: int, mesh) -> tuple[TrainState, Any]:
  """(state of jax.ShapeDtypeStruct with shardings, state shardings): a restore target."""
  boxed = jax.eval_shape(_init_fn(model, tx, example_tokens), jax.random.PRNGKey(seed))
  shardings = mesh_lib.tree_shardings(mesh, boxed)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
      shardings)
  return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, example_tokens, seed: int,
               shardings) -> TrainState:
  """The state initialised from `seed` directly into `shardings` (no full copy on one device)."""
  init = _init_fn(model, tx, example_tokens)
  return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.PRNGKey(seed))
