"""The resumable training iterator: a grain `DatasetIterator` with a JSON state.

`get_state()` returns plain JSON (lists, not tuples; Python ints), so it can be saved with
Orbax (`grain.checkpoint.CheckpointSave`) or `json.dumps`, and `set_state()` accepts what
`json.loads` gives back. The state carries a fingerprint of what shapes the stream (source,
seed, batch size, process slice, ...); restoring into a differently built iterator fails
with a message naming the differences instead of silently yielding other data.
"""

from __future__ import annotations

import atexit
import copy
import weakref
from typing import Any

import grain

STATE_VERSION = 1
_LIVE: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  # Background prefetch threads are daemons; stop them before the interpreter kills them
  # inside native code (which aborts the process with "terminate called ...").
  for it in list(_LIVE):
    it.close()


def _to_json(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # NumPy scalars
    return x.item()
  return x


def _from_json(x: Any) -> Any:
  """Undoes the tuple -> list change of JSON where grain compares with tuples."""
  if isinstance(x, dict):
    out = {k: _from_json(v) for k, v in x.items()}
    if isinstance(out.get("remainder_slices"), dict):  # ConcatThenSplit's (start, stop)
      out["remainder_slices"] = {k: tuple(v) for k, v in out["remainder_slices"].items()}
    return out
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


class DataIterator(grain.DatasetIterator):
  """Wraps the pipeline's grain iterator; yields batch dicts forever."""

  def __init__(self, inner: grain.DatasetIterator, *, fingerprint: dict[str, Any]):
    super().__init__(inner)
    self._fingerprint = _to_json(dict(fingerprint))
    _LIVE.add(self)

  @property
  def fingerprint(self) -> dict[str, Any]:
    return dict(self._fingerprint)

  def __next__(self) -> dict:
    self._assert_not_closed()
    return next(self._parent)

  def close(self) -> None:
    """Stops background threads; the iterator cannot be used afterwards."""
    if self._closed:
      return
    super().close()
    self._parents = ()  # let the stopped pipeline be freed now, not at interpreter teardown

  def get_state(self) -> dict[str, Any]:
    """A fresh JSON-able copy: mutating it never changes this iterator or a later state."""
    return copy.deepcopy({"version": STATE_VERSION, "fingerprint": self._fingerprint,
                          "grain": _to_json(self._parent.get_state())})

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise ValueError(f"not a loopjax data-iterator state (version {STATE_VERSION}): "
                       f"{str(state)[:200]}")
    saved = state.get("fingerprint", {})
    diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
    if diff:
      lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
      raise ValueError(f"data-iterator state was saved by a different pipeline ({lines})")
    self._parent.set_state(_from_json(state["grain"]))
