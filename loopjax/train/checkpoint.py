"""Orbax checkpoints of a run, the training side: saves the train state (params, EMA, optimizer,
step, rng) and the grain data-iterator state in one atomic step directory
`WORKDIR/checkpoints/<step>/`, and resumes a run from the newest readable one. Reading only the
weights (evaluation, export, fine-tuning) is `loopjax.checkpoints`.

Orbax writes into a temporary directory and renames it when complete, so a step directory that
exists is complete (on gs://, which has no rename, it writes the step directory in place and
marks it complete with commit_success.txt; an unmarked one is not a step); one whose files were damaged later is detected at restore, reported, and the
previous step is used instead (`loopjax.checkpoints.newest_readable`, shared with every reader).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from loopjax import storage
from loopjax.checkpoints import STATE, check_same_params, newest_readable
from loopjax.parallel import distributed

log = logging.getLogger("loopjax")
DATA = "data"  # the checkpoint item that holds the grain data-iterator state


class Checkpointer:
  """A run's checkpoint directory for training: saves steps, resumes from the newest readable."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = storage.resolve(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        handler_registry=_registry())

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iter) -> None:
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 DATA: grain.checkpoint.CheckpointSave(data_iter)})
    self.manager.save(step, args=args, force=True)

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
      return self.manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state),
          DATA: grain.checkpoint.CheckpointRestore(data_iter)}))[STATE]

    state, step, damaged = newest_readable(self.directory, steps, read)
    if damaged:
      self._set_aside(damaged)
    return state, step

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
  return reg
