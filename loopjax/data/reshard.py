"""The data position of a resumed run whose processes load other rows than the saved run's.

Row r of global batch k is the same example whatever the process layout (see pipeline.py), so a
run saved at step k by P processes has consumed exactly rows [0, k*G) of the stream, and a run
with another layout can be positioned there without replaying it:

  row streams (sudoku, arithmetic, prompt_answer, unpacked text/tfds): every pipeline shard's
      grain state is the index of its next local batch, which is the step, whatever rows it holds;
  packed text/tfds and prepared corpora: every row of the global batch has its own packing slot
      whose state (document index and offset) does not depend on which process runs it, so a new
      shard's state is the saved states of its rows' slots, taken from the old shards that held
      them. Prepared corpora save that per-slot state with grain worker processes too
      (`data.workers > 0`, see prepared.py), so any worker count resumes any other.

Anything else keeps state that cannot be split by row, and is refused with an error that names
what would make the resume exact.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

_LAYOUT_KEYS = ("process_index", "process_count")  # fingerprint keys that name the shard


class ResumeLayoutError(ValueError):
  """The saved data position cannot be carried over exactly to this run's process layout."""


def shard_states(process_state: dict) -> list[dict]:
  """The per-shard DataIterator states in one process's saved state (a ShardsIterator's holds
  several)."""
  if isinstance(process_state, dict) and isinstance(process_state.get("shards"), list):
    return list(process_state["shards"])
  return [process_state]


def _rows(state: dict, global_batch_size: int) -> range:
  f = state["fingerprint"]
  i, n = int(f["process_index"]), int(f["process_count"])
  return range(i * global_batch_size // n, (i + 1) * global_batch_size // n)


def _row_states(saved: Sequence[dict], global_batch_size: int, step: int) -> dict[int, Any]:
  """row -> that row's slot state (packed sources), or row -> None (row streams, after checking
  that every saved shard stands at batch `step`)."""
  out: dict[int, Any] = {}
  for s in saved:
    g, rows = s["grain"], _rows(s, global_batch_size)
    if set(g) == {"next_index"}:
      if int(g["next_index"]) != step:
        raise ResumeLayoutError(
            f"the saved data iterator stands at batch {g['next_index']}, not at the "
            f"checkpoint's step {step}")
      out.update((r, None) for r in rows)
    elif set(g) == {"parents"} and len(g["parents"]) == len(rows):  # packed text: one per slot
      out.update(zip(rows, g["parents"]))
    elif set(g) == {"doc", "offset"} and len(g["doc"]) == len(rows):  # prepared corpus slots
      out.update((r, (d, o)) for r, d, o in zip(rows, g["doc"], g["offset"]))
    else:
      raise ResumeLayoutError(
          "the saved data iterator keeps state that is not per row, so it cannot be split over "
          "another process layout; resume with the original number of processes and mesh")
  return out


def rederive(saved: Sequence[dict], fresh: Sequence[dict], *, global_batch_size: int,
             step: int) -> list[dict]:
  """The states of this process's shards (`fresh`: their states as newly opened) positioned
  after `step` global batches, from `saved`: every shard state of every process of the run
  that saved them.

  Raises ResumeLayoutError when the saved shards were made by another pipeline (other than
  which rows they load), do not cover the global batch once, or hold state that is not per row.
  """
  for s in saved:
    if int(s["fingerprint"]["global_batch_size"]) != global_batch_size:
      raise ResumeLayoutError(
          f"the checkpoint was trained with global batch size "
          f"{s['fingerprint']['global_batch_size']}, this run has {global_batch_size}")
  rows = _row_states(saved, global_batch_size, step)
  if sorted(rows) != list(range(global_batch_size)):
    raise ResumeLayoutError(
        f"the saved data states cover {len(rows)} distinct rows of the global batch of "
        f"{global_batch_size} (a checkpoint written by part of a job?)")
  out = []
  for f in fresh:
    mine = {k: v for k, v in f["fingerprint"].items() if k not in _LAYOUT_KEYS}
    for s in saved:
      theirs = {k: v for k, v in s["fingerprint"].items() if k not in _LAYOUT_KEYS}
      diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
      if diff:
        raise ResumeLayoutError(
            "the checkpoint's data pipeline differs from this run's in more than which rows "
            "each process loads: " + ", ".join(f"{k}: saved {theirs.get(k)!r} vs now "
                                               f"{mine.get(k)!r}" for k in diff))
    new, g = copy.deepcopy(f), f["grain"]
    mine_rows = _rows(f, global_batch_size)
    if set(g) == {"next_index"}:
      if any(rows[r] is not None for r in mine_rows):
        raise ResumeLayoutError("the saved data states are of another kind than this run's")
      new["grain"] = {"next_index": step}
    elif set(g) == {"parents"}:
      new["grain"] = {"parents": [copy.deepcopy(rows[r]) for r in mine_rows]}
    elif set(g) == {"doc", "offset"}:
      new["grain"] = {"doc": [rows[r][0] for r in mine_rows],
                      "offset": [rows[r][1] for r in mine_rows]}
    else:
      raise ResumeLayoutError(
          "this run's data iterator keeps state that is not per row; resume with the original "
          "number of processes and mesh")
    if any(rows[r] is None for r in mine_rows) and set(g) != {"next_index"}:
      raise ResumeLayoutError("the saved data states are of another kind than this run's")
    out.append(new)
  return out
