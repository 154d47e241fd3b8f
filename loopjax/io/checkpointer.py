"""Orbax checkpoints of a run, the training side: saves the train state (params, EMA, optimizer,
step, rng) and the grain data-iterator state in one atomic step directory
`WORKDIR/checkpoints/<step>/`, and resumes a run from the newest readable one. Reading only the
weights (evaluation, export, fine-tuning) is `loopjax.io.checkpoints`.

Orbax writes into a temporary directory and renames it when complete, so a step directory that
exists is complete (on gs://, which has no rename, it writes the step directory in place and
marks it complete with commit_success.txt; an unmarked one is not a step); one whose files were
damaged later is detected at restore, reported, and the previous step is used instead (`loopjax.io.checkpoints.newest_readable`, shared with every reader).

Kept: the newest `train.keep_checkpoints`, and besides them the `train.keep_best` with the lowest
held-out NELBO (`BEST_METRIC`, Orbax's step metrics, saved with the checkpoints of evaluated
steps; Orbax's LatestN and BestN preservation policies).

A checkpoint also records its process layout (item `layout`: process count, global batch size,
the batch rows each process loaded). A run with another layout (another number of processes or
another mesh) restores the train state onto its own mesh (Orbax reshards from the abstract
shardings) and re-derives each process's data position from the saved iterator states of all
the saved run's processes (loopjax/data/reshard.py), so that no example is skipped or repeated;
a different global batch size is refused, since no step of the new run starts where the saved
run stopped in the same stream.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from loopjax import storage
from loopjax.data import reshard
from loopjax.io.checkpoints import (BEST_METRIC, DATA, LAYOUT, STATE, CheckpointMismatchError,
                                    check_same_params, newest_readable)
from loopjax.parallel import distributed

log = logging.getLogger("loopjax")


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
