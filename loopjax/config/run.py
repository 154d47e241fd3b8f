"""One resolved run: an experiment file and its overrides turned, once, into a frozen, typed
description that every command receives instead of re-deriving its parts.

    run = resolve("experiments/sudoku.py:loopmdm", ["--config.train.steps=10"])
    run.model   ModelConfig: S_max from loops.train, the *configured* kernels (e.g. "auto")
    run.loops   LoopDistribution of loops.train (parsed here, once)
    run.data    DataSpec: the data section; its tokenizer and prepared manifest are read on first
                access and kept, so a command that needs neither reads neither
    run.train, run.mesh, run.config   the train and mesh sections and the whole resolved config

Kernel resolution (auto -> a kernel set) is not part of it: it is made from the devices a step is
compiled for (loopjax.model.resolve_kernels), so `run.config`, which is what a run folder's
config.json holds, keeps the configured name.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import ml_collections

from loopjax import storage
from loopjax.config.base import check_vocab, validate
from loopjax.config.load import load_config
from loopjax.data import DataSpec
from loopjax.loops import LoopDistribution
from loopjax.model import ModelConfig

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Run:
  config: ml_collections.FrozenConfigDict
  model: ModelConfig
  loops: LoopDistribution
  data: DataSpec
  train: ml_collections.FrozenConfigDict
  mesh: ml_collections.FrozenConfigDict

  def check_data(self) -> None:
    """Reads the data's tokenizer and a prepared corpus's manifest (each kept for the run) and
    checks the model's vocabulary covers the data: what training needs before any compile."""
    check_vocab(self.model, self.data)
    self.data.manifest  # noqa: B018 -- read here, so a bad corpus fails before any compile

  def to_json(self) -> str:
    return self.config.to_json(indent=2)

  def write(self, workdir: str) -> str:
    """Writes WORKDIR/config.json (whole or not at all); returns its path."""
    path = storage.join(workdir, CONFIG_FILE)
    storage.write_text(path, self.to_json())
    return path


def read_config_json(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, the config a run was trained with (`Run.write` wrote it)."""
  path = storage.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"{workdir} is not a loopjax run: no config.json (train one with "
                            "`loopjax train --config ... --workdir DIR`)")
  try:
    saved = json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is damaged, not a JSON config ({e}): restore the run's "
                     "config.json or train into a new --workdir") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path} is damaged: a JSON {type(saved).__name__}, not the run's config "
                     "object (restore it or train into a new --workdir)")
  if "format" in saved:  # an export's config.json names its format; a run's has no such key
    raise ValueError(f"{workdir} is a `loopjax export` folder, not a training workdir: this "
                     "command needs the run's workdir (sample, eval and analyze read either)")
  return ml_collections.ConfigDict(saved)


def from_config(config) -> Run:
  """The Run of an already read config (a ConfigDict, e.g. a run folder's config.json),
  validated; the data's tokenizer is read here only when model.vocab_size is 0 (the data's
  vocabulary), its manifest only where first used (DataSpec)."""
  if isinstance(config, Run):
    return config
  data = DataSpec.load(config.data)
  loops = LoopDistribution.parse(config.loops.train)
  model = validate(config, data, loops)
  frozen = ml_collections.FrozenConfigDict(config)
  return Run(config=frozen, model=model, loops=loops, data=data, train=frozen.train,
             mesh=frozen.mesh)


def resolve(spec: str, overrides: Sequence[str] = ()) -> Run:
  """The Run of `path.py[:variant]` with `--config.a.b=value` overrides (loopjax.config.load)."""
  return from_config(load_config(spec, overrides))
