"""A run's Orbax checkpoints, the reading side: `WORKDIR/checkpoints/<step>/`, one directory per
step, holding the item `state` (the train state as a dict: step, params, ema_params, opt_state,
rng), the item `data` (the grain iterator state of every process) and the item `layout` (the
process layout that saved them; see loopjax.io.checkpointer).

`loopjax.io.checkpointer` writes them and resumes a run from them; this module lists the steps,
checks a checkpoint's parameter tree against a model, and restores the parameters alone (raw or
EMA; no optimizer state is read) for evaluation, export and fine-tuning.

Every reader of a run's checkpoints goes through `newest_readable`: without an explicit step it
takes the newest checkpoint that reads back, warning on one line about each damaged one it
skipped; an explicit step that is damaged is an error naming it. `step="best"` (`--step best`)
takes the checkpoint with the lowest held-out NELBO the train loop recorded with it (Orbax's step
metrics, `BEST_METRIC`), and the next lowest past a damaged one.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

from loopjax import storage
from loopjax.errors import UserError

log = logging.getLogger("loopjax")

STATE = "state"  # the checkpoint item that holds the train state
DATA = "data"  # the checkpoint item that holds the grain data-iterator state
LAYOUT = "layout"  # the checkpoint item that records the process layout (JSON)
# The step metric (Orbax's, saved by the train loop with each evaluated checkpoint) that ranks
# checkpoints: held-out NELBO in nats per token; `--step best` takes the lowest.
BEST_METRIC = "eval_nats_per_token"
BEST = "best"
PARAMS = {"ema": "ema_params", "raw": "params"}  # which weights -> their key in the train state


def param_shape_diff(have, want, limit: int = 4) -> list:
  """Up to `limit` (path, shape) entries in which two parameter trees differ; [] if none.

  Leaves are anything with a .shape (arrays, ShapeDtypeStructs, Orbax metadata)."""
  def shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}

  a, b = shapes(have), shapes(want)
  return sorted(set(a.items()) ^ set(b.items()))[:limit] if a != b else []


class CheckpointMismatchError(ValueError):
  """A readable checkpoint of another architecture (not damage: no fallback past it)."""


class DamagedCheckpointError(UserError):
  """The checkpoint asked for, or every checkpoint of a run, cannot be read back."""


def check_same_params(meta, abstract_params, step: int, directory: str) -> None:
  """Refuses a checkpoint whose parameter names or shapes differ from the model's."""
  diff = param_shape_diff(meta, abstract_params)
  if diff:
    raise CheckpointMismatchError(
        f"checkpoint {step} in {directory} does not match this model (another architecture?): "
        f"parameters differ, e.g. {diff}. Use a new --workdir or the config the run was "
        "started with.")


def first_line(e: Exception) -> str:
  """One line naming an exception, for warnings about a damaged checkpoint."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def newest_readable(directory: str, steps: list[int], read: Callable[[int], Any], *,
                    step: int | None = None) -> tuple[Any, int, list[int]]:
  """(read(s), s, damaged steps skipped) for the newest step s whose `read` succeeds, or for
  `step` when given (an error if it is damaged: no silent fallback to another step).

  Any exception of `read` but CheckpointMismatchError counts as damage: truncated or garbled
  Orbax files surface as many exception types (tensorstore, msgpack, JSON, OS errors)."""
  steps = sorted(steps)
  if step is not None:
    if step not in steps:
      raise ValueError(f"{storage.dirname(directory)} has no checkpoint {step}; it has {steps}")
    try:
      return read(step), step, []
    except CheckpointMismatchError:
      raise
    except Exception as e:  # noqa: BLE001  (damage, see above)
      others = [s for s in steps if s != step]
      raise DamagedCheckpointError(
          f"checkpoint {step} in {directory} is unreadable ({first_line(e)}); "
          + (f"ask for another step (the run also has {others}) or omit the step to use the "
             "newest readable one" if others else "the run has no other checkpoint")) from None
  return first_readable(directory, list(reversed(steps)), read)


def first_readable(directory: str, candidates: list[int], read: Callable[[int], Any],
                   why: str = "") -> tuple[Any, int, list[int]]:
  """(read(s), s, damaged steps skipped) for the first of `candidates` whose `read` succeeds,
  warning about each damaged one; `why`: what the used step is, for the warning."""
  skipped = []
  for s in candidates:
    try:
      out = read(s)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # noqa: BLE001  (damage, see newest_readable)
      log.warning("checkpoint %d in %s is unreadable, skipping it: %s", s, directory,
                  first_line(e))
      skipped.append(s)
      continue
    if skipped:
      log.warning("using checkpoint %d%s instead (skipped damaged %s)", s, why, skipped)
    return out, s, skipped
  raise DamagedCheckpointError(
      f"no readable checkpoint in {directory}: steps {skipped} are all damaged (truncated or "
      "garbled files); start a new --workdir, or restore the files from a copy")


def parse_step(value) -> int | str | None:
  """A `--step` value: a checkpoint step (int), BEST, or None (the newest readable); argparse's
  `type` (its ArgumentTypeError prints the message as the one-line error)."""
  if value is None or value == BEST:
    return value
  try:
    return int(value)
  except (TypeError, ValueError):
    raise argparse.ArgumentTypeError(f"--step {value!r}: want a checkpoint step (an integer) or {BEST!r} (the "
                     "lowest held-out NELBO of training); omit it for the newest") from None


def ranked_by_metric(manager, directory: str) -> list[tuple[int, float]]:
  """[(step, BEST_METRIC)] of the checkpoints saved with one, lowest first (ties: newest
  first); a UserError when none has it."""
  scored = []
  for s in sorted(manager.all_steps()):
    try:
      value = (manager.metrics(s) or {}).get(BEST_METRIC)
    except Exception:  # noqa: BLE001  (a damaged metrics file: the step is not ranked)
      value = None
    if value is not None and math.isfinite(float(value)):
      scored.append((s, float(value)))
  if not scored:
    raise UserError(
        f"--step {BEST}: no checkpoint in {directory} was saved with a held-out NELBO (only "
        "steps the train loop evaluated at have one: train.eval_every must divide the saved "
        f"step); ask for a step instead (the run has {sorted(manager.all_steps())})")
  return sorted(scored, key=lambda x: (x[1], -x[0]))


def _reader(directory: str) -> ocp.CheckpointManager:
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  # The writer saves with StandardSave; PyTreeRestore reads it back and can restore a subtree.
  reg.add(STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
  # The other items get their handlers too, though never read here: Orbax reads every item's
  # metadata on a restore and warns about each item it has no handler for.
  reg.add(DATA, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler)
  reg.add(LAYOUT, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                               handler_registry=reg)


def restore_params(directory: str, abstract_params, *, step: int | str | None = None,
                   params: str = "ema"):
  """(params, step): the raw or EMA weights of checkpoint `step` (default: the newest
  readable one; see newest_readable; BEST: the readable one with the lowest held-out NELBO).

  abstract_params: the model's parameter tree of jax.ShapeDtypeStruct with shardings (the
  restore target layout); the checkpoint's names and shapes must equal it.
  """
  if params not in PARAMS:
    raise ValueError(f"params must be one of {sorted(PARAMS)}, got {params!r}")
  directory = storage.resolve(directory)
  run = storage.dirname(directory)
  if not storage.isdir(directory):
    raise FileNotFoundError(f"{run} has no checkpoints yet")
  key = PARAMS[params]
  manager = _reader(directory)
  target = {key: abstract_params}

  def read(s: int):
    check_same_params(manager.item_metadata(s)[STATE][key], abstract_params, s, directory)
    restored = manager.restore(s, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))
    return restored[STATE][key]

  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"{run} has no checkpoints yet")
    if step == BEST:
      ranked = ranked_by_metric(manager, directory)
      tree, step, _ = first_readable(directory, [s for s, _ in ranked], read,
                                     " (the lowest held-out NELBO of the readable ones)")
      log.info("--step best: checkpoint %d, held-out NELBO %.4f nats/token", step,
               dict(ranked)[step])
    else:
      tree, step, _ = newest_readable(directory, steps, read, step=step)
  finally:
    manager.close()
  return tree, step
