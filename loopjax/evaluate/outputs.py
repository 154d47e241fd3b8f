"""Where a command reading a model writes its eval/, plots/ and samples/.

A training workdir gets its results inside it (WORKDIR/eval, WORKDIR/plots, WORKDIR/samples); an
export folder is never written into: results go beside it, to `<EXPORT>.outputs/` with the same
layout; an explicit output folder overrides both.
"""

from __future__ import annotations

import os

from loopjax import folders
from loopjax.io.export_format import is_export

EXPORT_OUTPUT_SUFFIX = ".outputs"


def output_dir(path: str, out: str | None = None) -> str:
  """The folder a command reading the model at `path` writes its eval/, plots/ and samples/
  under: `out` when given; `<path>.outputs` beside an export folder; else the workdir itself."""
  if out:
    return out
  if is_export(path):
    return os.path.normpath(path) + EXPORT_OUTPUT_SUFFIX
  return path


def claim_output_dir(path: str, out: str | None = None, flag: str = "--output-dir") -> str:
  """`output_dir(path, out)`, refused (one line, nothing written) when it holds an export, a
  prepared corpus or a study rather than a run or earlier outputs; `flag` names `out` there."""
  d = output_dir(path, out)
  folders.claim(d, "outputs", flag=flag if out else "--workdir")
  return d
