"""A run's Orbax checkpoints, read and written: `WORKDIR/checkpoints/<step>/`, one directory per
step, holding the item `state` (the train state as a dict: step, params, ema_params, opt_state,
rng), the item `data` (the grain iterator state of every process) and the item `layout` (the
process layout that saved them).

Writing and resuming (`Checkpointer`, the train loop's): the train state and the data-iterator
state are saved in one atomic step directory. Orbax writes into a temporary directory and
renames it when complete, so a step directory that exists is complete (on gs://, which has no
rename, it writes the step directory in place and marks it complete with commit_success.txt; an
unmarked one is not a step). Kept: the newest `train.keep_checkpoints`, and besides them the
`train.keep_best` with the lowest held-out NELBO (`BEST_METRIC`, Orbax's step metrics, saved
with the checkpoints of evaluated steps; Orbax's LatestN and BestN preservation policies).

A checkpoint records its process layout (process count, global batch size, the batch rows each
process loaded). A run with another layout (another number of processes or another mesh)
restores the train state onto its own mesh (Orbax reshards from the abstract shardings) and
re-derives each process's data position from the saved iterator states of all the saved run's
processes (loopjax/data/reshard.py), so that no example is skipped or repeated; a different
global batch size is refused, since no step of the new run starts where the saved run stopped
in the same stream.

Reading the weights alone (`restore_params`: evaluation, export, fine-tuning): lists the steps,
checks a checkpoint's parameter tree against a model, and restores the raw or EMA parameters
(no optimizer state is read).

Every reader goes through `newest_readable`: without an explicit step it takes the newest
checkpoint that reads back, warning on one line about each damaged one it skipped (a resuming
run also sets them aside); an explicit step that is damaged is an error naming it.
`step="best"` (`--step best`) takes the checkpoint with the lowest held-out NELBO the train loop
recorded with it (`BEST_METRIC`), and the next lowest past a damaged one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from loopjax import storage
from loopjax.data import reshard
from loopjax.errors import UserError
from loopjax.parallel import distributed

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


# ------------------------------------------------------------------------------------------------
# Writing and resuming.

def process_layout(global_batch_size: int, row_shards: list) -> dict:
  """What a checkpoint records of the layout that saved it; `row_shards[p]`: the data-pipeline
  shards [(index, count), ...] process p loads."""
  return {"process_count": len(row_shards), "global_batch_size": int(global_batch_size),
          "row_shards": [[[int(i), int(n)] for i, n in shards] for shards in row_shards]}


class Checkpointer:
  """A run's checkpoint directory for training: saves steps, resumes from the newest readable."""

  def __init__(self, directory: str, *, keep: int = 3, keep_best: int = 0,
               async_save: bool = True, layout: dict | None = None):
    """keep: the newest checkpoints kept; keep_best: besides them, the checkpoints saved with
    the lowest `BEST_METRIC` (saved with `metrics`); the others are deleted."""
    self.directory = storage.resolve(directory)
    self.layout = layout  # this run's `process_layout` (None: not recorded, not checked)
    # A step saved without an evaluation has empty metrics ({}: Orbax warns on None): it ranks
    # last (BestN keeps the lowest, sorting descending with reverse=True).
    metric = lambda m: m.get(BEST_METRIC, float("inf"))
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:  # BestN sorts ascending with reverse=False and keeps the last n: the highest
      # Steps with no metrics at all (saved before checkpoints carried them) are kept only
      # while among the newest.
      policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=metric, reverse=True,
                                                    n=keep_best,
                                                    keep_checkpoints_without_metrics=False))
    # best_fn makes Orbax write the metrics of a save into the step (read back after a restart).
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, best_fn=metric, best_mode="min",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        handler_registry=_registry())

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iter, metrics: dict | None = None) -> None:
    """metrics: {BEST_METRIC: held-out NELBO} when the step was evaluated (None: it was not; it
    is then kept only while among the newest)."""
    items = {STATE: ocp.args.StandardSave(state),
             DATA: grain.checkpoint.CheckpointSave(data_iter)}
    if self.layout is not None:
      items[LAYOUT] = ocp.args.JsonSave(self.layout)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or {},
                      force=True)

  def restore_latest(self, abstract_state, data_iter) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint; skips damaged ones with a warning (and sets
    them aside, so that their steps can be saved again).

    Returns (state, step) or None when there is no checkpoint. `abstract_state` holds
    jax.ShapeDtypeStruct leaves with shardings (the restore target layout, any mesh).
    """
    steps = self.steps()
    if not steps:
      return None

    def read(step: int):
      meta = self.manager.item_metadata(step)[STATE]["params"]
      check_same_params(meta, abstract_state.params, step, self.directory)
      saved = self._saved_layout(step)
      if saved is None or self.layout is None or saved == self.layout:
        return self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: grain.checkpoint.CheckpointRestore(data_iter)}))[STATE]
      # Another layout: the data position first (a refusal comes before reading the state).
      self._rederive_data(step, saved, data_iter)
      log.info("checkpoint %d was saved by %d process(es) (row shards %s); this run has %d "
               "(%s): train state resharded, data position re-derived", step,
               saved["process_count"], saved["row_shards"], self.layout["process_count"],
               self.layout["row_shards"])
      return self.manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]

    state, step, damaged = newest_readable(self.directory, steps, read)
    if damaged:
      self._set_aside(damaged)
    return state, step

  def _saved_layout(self, step: int) -> dict | None:
    """The layout checkpoint `step` recorded (None for a checkpoint that has none)."""
    if not (epath.Path(self.directory) / str(step) / LAYOUT).exists():
      return None
    return dict(self.manager.restore(step, args=ocp.args.Composite(**{
        LAYOUT: ocp.args.JsonRestore()}))[LAYOUT])

  def _rederive_data(self, step: int, saved: dict, data_iter) -> None:
    """Positions `data_iter` after `step` global batches from every saved process's state."""
    where = f"checkpoint {step} in {self.directory}"
    if saved["global_batch_size"] != self.layout["global_batch_size"]:
      raise CheckpointMismatchError(
          f"{where} was trained with global batch size {saved['global_batch_size']}, this run "
          f"has train.batch_size={self.layout['global_batch_size']}: the data stream's steps "
          "would not line up (examples skipped or repeated). Resume with the original batch "
          "size, or start a new --workdir with train.init_from.")
    n = saved["process_count"]
    folder = epath.Path(self.directory) / str(step) / DATA
    states = []
    for p in range(n):
      path = folder / f"process_{p}-of-{n}.json"
      states.extend(reshard.shard_states(json.loads(path.read_text())))
    mine = data_iter.get_state()
    try:
      new = reshard.rederive(states, reshard.shard_states(mine),
                             global_batch_size=saved["global_batch_size"], step=step)
    except reshard.ResumeLayoutError as e:
      raise CheckpointMismatchError(
          f"{where} cannot be resumed with this run's process layout ({n} -> "
          f"{self.layout['process_count']} processes): {e}") from None
    data_iter.set_state(dict(mine, shards=new) if "shards" in mine else new[0])

  def _set_aside(self, steps) -> None:
    """Renames damaged step directories (kept for inspection) so their steps can be re-saved."""
    if jax.process_index() == 0:
      for step in steps:
        src = storage.join(self.directory, str(step))
        dst = f"{src}.damaged-{int(time.time())}"
        storage.rename(src, dst)
        log.warning("moved damaged checkpoint %d to %s", step, dst)
    distributed.barrier("loopjax_set_aside_damaged_checkpoints")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _registry():
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  reg.add(STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
  reg.add(STATE, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  reg.add(DATA, grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointHandler)
  reg.add(DATA, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler)
  reg.add(LAYOUT, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
  reg.add(LAYOUT, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return reg
