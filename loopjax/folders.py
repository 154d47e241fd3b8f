"""What a folder is, read from the files loopjax's commands write into it, and refusing to write
into a folder that belongs to something else.

  export    config.json with Hugging Face `model_type` or `architectures` (`loopjax export`,
            or any HF model folder)
  prepared  manifest.json (`loopjax prepare`)
  study     study.json (`loopjax study`)
  run       config.json without `model_type`, lock.json or checkpoints/ (`loopjax train`)
  outputs   eval/ or samples/ and none of the above (`eval`, `sample`, `analyze`
            with --out, or beside an export)

Every command that writes into a folder calls `claim(path, kind)` before it does any work; the
folder is only read, so a refused folder stays byte-for-byte as it was. A folder holding none of
these files (missing, empty, or someone's own files) is anyone's. Local paths and gs:// URLs alike
(loopjax.storage).
"""

from __future__ import annotations

import json

from loopjax import storage
from loopjax.errors import UserError

KINDS = ("export", "prepared", "study", "run", "outputs")
_NAMES = {"export": "a model export", "prepared": "a prepared corpus", "study": "a study",
          "run": "a training run", "outputs": "an eval/sample output folder"}
# Kinds a writer may share a folder with besides its own: eval and sample write eval/, plots/
# and samples/ into a run's workdir by default.
_SHARES = {"outputs": ("run",)}


class FolderKindError(UserError):
  """A command was pointed at a folder that belongs to another kind of output."""


def _json(path: str):
  try:
    return json.loads(storage.read_text(path))
  except (OSError, ValueError):
    return None


def kind_of(path: str) -> tuple[str | None, str | None]:
  """(kind, the file that shows it) of folder `path`; (None, None) when it is none of KINDS."""
  if not storage.isdir(path):
    return None, None
  names = set(storage.listdir(path))
  if "config.json" in names:
    config = _json(storage.join(path, "config.json"))
    if isinstance(config, dict) and ("model_type" in config or "architectures" in config):
      return "export", "config.json"
  for name, kind in (("manifest.json", "prepared"), ("study.json", "study")):
    if name in names:
      return kind, name
  for name in ("config.json", "lock.json", "checkpoints"):
    if name in names:
      return "run", name
  for name in ("eval", "samples"):
    if name in names:
      return "outputs", name + "/"
  return None, None


def claim(path: str, kind: str, *, flag: str = "--workdir") -> None:
  """Raises FolderKindError (one line) when folder `path` holds another kind than `kind`."""
  if kind not in KINDS:
    raise ValueError(f"folder kind must be one of {KINDS}, got {kind!r}")
  found, evidence = kind_of(path)
  if found is None or found == kind or found in _SHARES.get(kind, ()):
    return
  raise FolderKindError(
      f"{flag} {path} is {_NAMES[found]} (it holds {evidence}), not {_NAMES[kind]}; nothing "
      f"was written to it: choose a new or empty folder")
