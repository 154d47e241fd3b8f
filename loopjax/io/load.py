"""Trained weights in: a model and its parameters from a run's workdir (`config.json` and Orbax
checkpoints, `loopjax.io.checkpoints`) or from an export folder (`loopjax.io.export_format`).

`load_model_dir` returns one `Loaded` for either: the config, the model and its weights, the
data spec whose tokenizer is read once for the whole load, and `Loaded.policy`, where a `--loops`
value becomes the LoopPolicy of this model (parsed and resolved once; evaluations take it
resolved).

The model's kernel set is decided here, at load time, from this process's devices (`runnable`):
`auto` resolves for them, and a set bound to other devices (splash off TPU, cudnn off GPU) falls
back to the reference with one info line, so a run trained on an accelerator samples, evaluates
and exports on any host. What a config or an export records stays the configured set.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from loopjax import config as config_lib
from loopjax import ema, storage
from loopjax.data import DataSpec
from loopjax.io import checkpoints
from loopjax.loops import LoopPolicy, resolve_policy
from loopjax.io.export_format import (CONFIG, DTYPES, WEIGHTS,
                                      abstract_params, check_tensors, file_sha256, is_export,
                                      read_export_config, read_tensors, restack)
from loopjax.model import LoopedTransformer, ModelConfig, resolve_kernels
from loopjax.model.config import RUNTIME_FIELDS
from loopjax.model.kernels import runs_on

log = logging.getLogger("loopjax")


def load_export(out: str, *, param_dtype: str | None = "float32", verify_checksum: bool = True,
                runtime: dict | None = None):
  """(model, params, export_config) rebuilt from an exported folder alone.

  model: LoopedTransformer of the exported architecture (`model.cfg`); params: the stacked Flax
  tree (unboxed) in `param_dtype` (None: as stored); export_config: config.json as a dict.
  runtime: ModelConfig fields that do not change the weights, e.g. {"max_loops": 24} (the static
  loop length of `model.apply`, to run S > S_max of training; not with `loop_embedding`),
  {"kernels": "reference"}, "remat", "loop_remat", "dtype",
  "scan_unroll", "unroll_layers".
  """
  config = read_export_config(out)
  try:
    cfg = ModelConfig.from_dict(config["architecture"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{os.path.join(out, CONFIG)}: bad architecture: {e}") from None
  dtype = config.get("weights", {}).get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"{os.path.join(out, CONFIG)}: unknown weights dtype {dtype!r}")
  tensors = read_tensors(out, dtype)
  model = LoopedTransformer(runnable(cfg, quiet=True))
  abstract = traverse_util.flatten_dict(abstract_params(model))
  check_tensors(cfg, abstract, tensors, out)
  sha = config.get("weights", {}).get("sha256")
  if verify_checksum and sha and file_sha256(os.path.join(out, WEIGHTS)) != sha:
    raise ValueError(f"{os.path.join(out, WEIGHTS)}: SHA-256 differs from the one recorded in "
                     f"{CONFIG} at export: the file was modified or corrupted (pass "
                     "verify_checksum=False to load a deliberately edited file)")
  stored = jnp.float32 if dtype == "float32" else jnp.bfloat16
  params = restack(cfg, abstract, tensors, jnp.dtype(param_dtype or stored))
  return LoopedTransformer(with_runtime(cfg, runtime)), params, config


def with_runtime(cfg, runtime: dict | None):
  """`cfg` with weight-independent fields replaced (see load_export), validated."""
  runtime = {k: v for k, v in (runtime or {}).items() if getattr(cfg, k, None) != v}
  if set(runtime) - set(RUNTIME_FIELDS) or ("max_loops" in runtime and cfg.loop_embedding):
    raise ValueError(f"runtime may change only {RUNTIME_FIELDS} (max_loops not with "
                     f"loop_embedding), got {runtime}")
  return runnable(type(cfg).from_dict({**dataclasses.asdict(cfg), **runtime}))


def runnable(cfg: ModelConfig, *, quiet: bool = False) -> ModelConfig:
  """`cfg` with its kernel set resolved for this process's devices, where the loaded model runs
  (sampling, evaluation, export): `auto` picks the platform's set; a set bound to other devices
  (splash, cudnn) computes the same math with the reference kernels (one info line unless
  `quiet`)."""
  devices = jax.local_devices()
  if not runs_on(cfg.kernels, devices):
    if not quiet:
      log.info("model.kernels=%s does not run on this host's %s devices: loaded with the "
               "reference kernels (the same math)", cfg.kernels,
               ",".join(sorted({d.platform for d in devices})))
    cfg = dataclasses.replace(cfg, kernels="reference")
  return resolve_kernels(cfg, devices)


# ------------------------------------------------------------------------------------------------
# A run's workdir.

def read_run(workdir: str) -> config_lib.Run:
  """The resolved Run of a training workdir's config.json (refusing an export folder): the one
  place a saved run's ModelConfig, S_max and data spec are derived."""
  if is_export(workdir):
    raise ValueError(f"{workdir} is a `loopjax export` folder, not a training workdir: this "
                     "command needs the run's workdir (sample, eval and analyze read either)")
  return config_lib.from_config(config_lib.read_config_json(workdir))


def load_run(workdir: str, *, step: int | None = None, params: str = "ema"):
  """(run, model, params, step) of the newest (or given) checkpoint of a run.

  run: the workdir's resolved Run (read_run); model: its LoopedTransformer with the kernels
  resolved for this host (runnable). params: "ema" (EMA weights) or "raw" (the optimizer's
  current weights); the optimizer state is not read. The parameters are placed on this
  process's first device.
  """
  if params not in checkpoints.PARAMS:
    raise ValueError(f"params must be 'ema' or 'raw', got {params!r}")
  run = read_run(workdir)
  config = run.config
  model = LoopedTransformer(runnable(run.model))
  target = abstract_params(model, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  tree, step = checkpoints.restore_params(storage.join(workdir, "checkpoints"), target,
                                          step=step, params=params)
  if params == "ema":
    train = config.get("train", {})
    warn_young_ema(workdir, step, train.get("ema_decay"), warmup=bool(train.get("ema_warmup")),
                   fix="pass --params raw (Python: params='raw') for the optimizer's weights")
  return run, model, tree, step


_WARNED_EMA: set = set()


def warn_young_ema(path: str, step, decay, *, fix: str, warmup: bool = False) -> bool:
  """Warns (once per folder and step) when EMA weights are still mostly the initialisation
  (`loopjax.ema.is_young`: without warm-up, fewer than 1/(1 - decay) steps averaged), so samples
  and scores of them understate the training."""
  if step is None or decay is None or not 0.0 < float(decay) < 1.0:
    return False
  if not ema.is_young(int(step), float(decay), warmup) or (path, int(step)) in _WARNED_EMA:
    return False
  _WARNED_EMA.add((path, int(step)))
  logging.getLogger("loopjax").warning(
      "%s: %.1f%% of the EMA weights at step %d is still the initialisation (ema_decay %g "
      "averages about %d steps%s); %s", path,
      100 * ema.init_share(int(step), float(decay), warmup), int(step), float(decay),
      round(1.0 / (1.0 - float(decay))), ", after MDLM's warm-up" if warmup else "", fix)
  return True


# ------------------------------------------------------------------------------------------------
# Either.

@dataclasses.dataclass(frozen=True, eq=False)
class Loaded:
  """A model loaded from a training workdir or an export folder: what sample, eval, analyze,
  lm-eval and the Python API receive.

  config: an ml_collections.ConfigDict shaped like a run's config (`model`, `loops.train`,
  `diffusion`, `data`, ...) with `config.source` = {kind: "workdir"|"export", path, params,
  step}; model: a LoopedTransformer whose `model.cfg` is the authoritative architecture
  (resolved vocab size, max_loops = S_max = default S, kernels resolved for this host); params:
  the stacked Flax tree for `model.apply({"params": p}, tokens, loops, t, segment_ids)`;
  run: a workdir's resolved Run (`read_run`), None for an export.

  `data` is the load's one DataSpec (a workdir's `run.data`; for an export, made from
  `config.data` on first use) and `tokenizer` its tokenizer, read once and kept. `policy(loops)`
  turns a `--loops` value (int, spec string or LoopPolicy) into a LoopPolicy resolved for this
  model: the command line and the API call it once per value, and the evaluations take what it
  returns.
  """

  config: Any
  model: Any
  params: Any
  run: config_lib.Run | None = None

  def __repr__(self) -> str:
    s = self.source
    return (f"Loaded({s.get('kind')} {s.get('path')}, params={s.get('params')}, "
            f"step={s.get('step')})")

  @property
  def source(self) -> dict:
    return self.config.source

  @functools.cached_property
  def data(self) -> DataSpec:
    return self.run.data if self.run is not None else DataSpec.load(self.config.data)

  @property
  def tokenizer(self):
    return self.data.tokenizer

  def policy(self, loops) -> LoopPolicy:
    """`loops` (an int S, a `--loops` spec such as "max" or "adaptive:0.01", or a LoopPolicy)
    parsed with this model's S_max, defaults filled in and checked against its loop-embedding
    table (`loopjax.loops.resolve_policy`)."""
    return resolve_policy(self.model.cfg, loops)


def load_model_dir(path: str, *, params: str | None = None, step: int | None = None,
                   param_dtype: str | None = "float32", verify_checksum: bool = True,
                   runtime: dict | None = None) -> Loaded:
  """The `Loaded` model of a training workdir or an exported folder.

  For a workdir, `config` is the run's config and `run` its resolved Run (whose DataSpec is the
  load's `data`); for an export, `config` is its `training_config` with `data.tokenizer` pointing
  at the copied tokenizer file, or, when the export has no training config, only `model`,
  `loops` (train None), `diffusion` and `data.seq_len`/`data.tokenizer`.
  params/step: which checkpoint of a workdir ("ema" default); for an export they must match what
  was exported (or be None). param_dtype, verify_checksum (exports only), runtime: see load_export.
  """
  if not is_export(path):
    run, model, tree, got = load_run(path, step=step, params=params or "ema")
    config = ml_collections.ConfigDict(run.config)  # a mutable copy that carries `source`
    model = LoopedTransformer(with_runtime(model.cfg, runtime))
    config.source = {"kind": "workdir", "path": storage.resolve(path),
                     "params": params or "ema", "step": int(got)}
    return Loaded(config, model, tree, run)
  model, tree, exp = load_export(path, param_dtype=param_dtype, verify_checksum=verify_checksum,
                                 runtime=runtime)
  w = exp.get("weights", {})
  for key, asked in (("params", params), ("step", step)):
    if asked is not None and w.get(key) is not None and asked != w[key]:
      raise ValueError(f"{path} holds {key}={w[key]!r}, not {asked!r}")
  tok, arch = exp.get("tokenizer") or {}, exp["architecture"]
  config = ml_collections.ConfigDict(exp.get("training_config") or {
      "model": {k: v for k, v in arch.items() if k != "max_loops"},
      "loops": {"train": exp["loop"].get("train_loops"), "eval": 0},
      "diffusion": exp.get("noise_schedule") or {},
      "data": {"seq_len": arch["max_length"], "tokenizer": tok.get("spec")}})
  if tok.get("files") and tok.get("spec"):  # the copied file, not the training machine's path
    kind = tok["spec"].partition(":")[0]
    config.data.tokenizer = f"{kind}:{storage.join(storage.resolve(path), tok['files'][0])}"
  config.source = {"kind": "export", "path": storage.resolve(path),
                   "params": w.get("params"), "step": w.get("step")}
  if w.get("params") == "ema":
    train = config.get("train", {})
    warn_young_ema(path, w.get("step"), train.get("ema_decay"),
                   warmup=bool(train.get("ema_warmup")),
                   fix="export the run again with --params raw for the optimizer's weights")
  return Loaded(config, model, tree)
