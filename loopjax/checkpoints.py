"""A run's Orbax checkpoints, the reading side: `WORKDIR/checkpoints/<step>/`, one directory per
step, holding the item `state` (the train state as a dict: step, params, ema_params, opt_state,
rng) and the item `data` (the grain iterator state).

`loopjax.train.checkpoint` writes them and resumes a run from them; this module lists the steps,
checks a checkpoint's parameter tree against a model, and restores the parameters alone (raw or
EMA; no optimizer state is read) for evaluation, export and fine-tuning.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

STATE = "state"  # the checkpoint item that holds the train state
PARAMS = {"ema": "ema_params", "raw": "params"}  # which weights -> their key in the train state


def param_shape_diff(have, want, limit: int = 4) -> list:
  """Up to `limit` (path, shape) entries in which two parameter trees differ; [] if none.

  Leaves are anything with a .shape (arrays, ShapeDtypeStructs, Orbax metadata)."""
  def shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}

  a, b = shapes(have), shapes(want)
  return sorted(set(a.items()) ^ set(b.items()))[:limit] if a != b else []


def check_same_params(meta, abstract_params, step: int, directory: str) -> None:
  """Refuses a checkpoint whose parameter names or shapes differ from the model's."""
  diff = param_shape_diff(meta, abstract_params)
  if diff:
    raise ValueError(
        f"checkpoint {step} in {directory} does not match this model (another architecture?): "
        f"parameters differ, e.g. {diff}. Use a new --workdir or the config the run was "
        "started with.")


def first_line(e: Exception) -> str:
  """One line naming an exception, for warnings about a damaged checkpoint."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _reader(directory: str) -> ocp.CheckpointManager:
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  # The writer saves with StandardSave; PyTreeRestore reads it back and can restore a subtree.
  reg.add(STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                               handler_registry=reg)


def restore_params(directory: str, abstract_params, *, step: int | None = None,
                   params: str = "ema"):
  """(params, step): the raw or EMA weights of checkpoint `step` (default: the newest).

  abstract_params: the model's parameter tree of jax.ShapeDtypeStruct with shardings (the
  restore target layout); the checkpoint's names and shapes must equal it.
  """
  if params not in PARAMS:
    raise ValueError(f"params must be one of {sorted(PARAMS)}, got {params!r}")
  directory = os.path.abspath(directory)
  run = os.path.dirname(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{run} has no checkpoints yet")
  key = PARAMS[params]
  manager = _reader(directory)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"{run} has no checkpoints yet")
    if step is not None and step not in steps:
      raise ValueError(f"{run} has no checkpoint {step}; it has {steps}")
    step = steps[-1] if step is None else step
    check_same_params(manager.item_metadata(step)[STATE][key], abstract_params, step, directory)
    target = {key: abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))
  finally:
    manager.close()
  return restored[STATE][key], step
