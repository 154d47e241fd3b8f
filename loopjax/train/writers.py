"""Where logged training rows go: the writers named by `train.writers`, a comma list (default
`jsonl,tensorboard`; e.g. `jsonl,tensorboard,wandb`). Every writer gets every logged row
(`write(step, row)`, row = {key: number, string or {S: number}}) and is closed at the end of the
run; only process 0 opens writers.

Built in:
  jsonl        WORKDIR/metrics.jsonl, one JSON row per logged step (a resumed run first drops
               the rows after the step it resumed from: they are logged again as replayed)
  tensorboard  WORKDIR/tb, tensorboardX event files (per-S breakdowns as `key/S` curves)
  wandb        Weights & Biases (`pip install -e '.[wandb]'`), project `train.wandb_project`,
               run files under WORKDIR/wandb (a gs:// workdir: W&B's default ./wandb). The run
               id is kept in WORKDIR/wandb_run_id, so a resumed run attaches to the same W&B
               run. W&B's own environment applies: WANDB_MODE=offline writes locally with no
               network (upload later with `wandb sync WORKDIR/wandb/offline-run-*`),
               WANDB_API_KEY, WANDB_ENTITY.
               W&B keeps a run's steps increasing: rows of steps it already has (replayed after
               a resume from an earlier checkpoint) are dropped by W&B with a warning.

Adding a writer: a factory `make(ctx: WriterContext) -> Writer` (any object with
`write(step, row)` and `close()`), registered under a name either in Python before training,

    from loopjax.train import writers
    writers.register("csv", make)

or, for the `loopjax train` command, as an entry point of the installed package that holds it,

    entry_points={"loopjax.writers": ["csv = mypackage.csv_writer:make"]}

and then named in `--config.train.writers=jsonl,csv`.

clu's `metric_writers` is not used: importing it imports its TensorFlow summary writer, and
loopjax does not depend on TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
from typing import Any, Callable, Protocol

from loopjax import storage

DEFAULT = "jsonl,tensorboard"
ENTRY_POINT_GROUP = "loopjax.writers"
WANDB_RUN_ID = "wandb_run_id"  # the workdir file that keeps the W&B run id across resumes


class Writer(Protocol):
  def write(self, step: int, row: dict) -> None: ...

  def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class WriterContext:
  """What a writer factory gets: the run's workdir, the step it starts (or resumes) from, and
  its config (an ml_collections.ConfigDict; None outside a training run)."""
  workdir: str
  start_step: int = 0
  config: Any = None


# Built-in writers whose package is an extra of loopjax: {name: extra}.
_EXTRAS = {"wandb": "wandb"}
_FACTORIES: dict[str, Callable[[WriterContext], Writer]] = {}


def register(name: str, factory: Callable[[WriterContext], Writer]) -> None:
  _FACTORIES[name] = factory


def _factory(name: str):
  if name not in _FACTORIES:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
      register(name, ep.load())
  return _FACTORIES.get(name)


def parse(spec: str) -> list[str]:
  """The writer names of a `train.writers` value, each known and with its package installed; a
  ValueError names the bad one (checked when the config is validated, before any work)."""
  names = [n.strip() for n in str(spec).split(",") if n.strip()]
  for n in names:
    if _factory(n) is None:
      raise ValueError(f"train.writers={spec!r}: no writer named {n!r}; known: "
                       f"{', '.join(sorted(_FACTORIES))} (or register one, see "
                       "loopjax/train/writers.py)")
    if n in _EXTRAS and importlib.util.find_spec(n) is None:
      raise ValueError(f"train.writers={spec!r} names {n} but the {n} package is missing: "
                       f"pip install -e '.[{_EXTRAS[n]}]' (or drop {n} from train.writers)")
  if len(set(names)) != len(names):
    raise ValueError(f"train.writers={spec!r} names a writer twice")
  return names


def open_writers(spec: str, ctx: WriterContext) -> list[Writer]:
  opened = []
  try:
    for n in parse(spec):
      opened.append(_factory(n)(ctx))
  except BaseException:
    for w in opened:
      w.close()
    raise
  return opened


def jsonable(v):
  """A row value as JSON: numpy/jax scalars as Python numbers, non-finite floats as strings."""
  if isinstance(v, dict):
    return {str(k): jsonable(x) for k, x in v.items()}
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def scalars(row: dict) -> dict[str, float]:
  """The numbers of a row as flat curves: `key`, and `key/S` for a per-S breakdown."""
  out = {}
  for k, v in row.items():
    if isinstance(v, dict):
      out |= {f"{k}/{sub}": x for sub, x in v.items()
              if isinstance(x, (int, float)) and not isinstance(x, bool)}
    elif k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
      out[k] = v
  return out


class JsonlWriter:
  def __init__(self, ctx: WriterContext):
    path = storage.join(ctx.workdir, "metrics.jsonl")
    keep_rows_through(path, ctx.start_step)
    self._log = storage.AppendLog(path)

  def write(self, step: int, row: dict) -> None:
    self._log.write(json.dumps({"step": int(step), **jsonable(row)}) + "\n")
    self._log.flush()

  def close(self) -> None:
    self._log.close()


def keep_rows_through(path: str, step: int) -> int:
  """Rewrites the metrics.jsonl at `path` (whole, at once) with only its rows of steps <= `step`,
  dropping a torn last line; returns the number of rows dropped."""
  if not storage.exists(path):
    return 0
  kept, dropped = [], 0
  for line in storage.read_text(path).splitlines(keepends=True):
    try:
      ok = int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):  # a row cut short by a kill
      ok = False
    kept += [line if line.endswith("\n") else line + "\n"] * ok
    dropped += not ok
  if dropped:
    storage.write_text(path, "".join(kept))
  return dropped


class TensorBoardWriter:
  def __init__(self, ctx: WriterContext):
    self._tb = storage.summary_writer(storage.join(ctx.workdir, "tb"))

  def write(self, step: int, row: dict) -> None:
    for k, v in scalars(jsonable(row)).items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()


class WandbWriter:
  """One W&B run per workdir: its id is created at the first start and read back on resume."""

  def __init__(self, ctx: WriterContext):
    import wandb  # an extra (parse() names it when missing)
    id_path = storage.join(ctx.workdir, WANDB_RUN_ID)
    run_id = storage.read_text(id_path).strip() if storage.exists(id_path) else None
    config = ctx.config
    project = (config.train.get("wandb_project") if config is not None else None) or "loopjax"
    local = None if storage.is_remote(ctx.workdir) else storage.resolve(ctx.workdir)
    # A first start lets W&B choose the id; a resume passes it back ("allow": attach to it).
    self.run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None,
                          dir=local, name=storage.basename(storage.resolve(ctx.workdir)),
                          config=config.to_dict() if config is not None else None)
    if run_id is None:
      storage.write_text(id_path, self.run.id + "\n")

  def write(self, step: int, row: dict) -> None:
    values = scalars(jsonable(row))
    # Strings (which weights were evaluated) are run facts, not curves.
    values |= {k: v for k, v in row.items() if isinstance(v, str) and k != "step"}
    self.run.log(values, step=int(step))

  def close(self) -> None:
    self.run.finish()


register("jsonl", JsonlWriter)
register("tensorboard", TensorBoardWriter)
register("wandb", WandbWriter)
