"""Trained weights in: a model and its parameters from a run's workdir or an export folder.

A run's workdir holds `config.json` (the run's config) and Orbax checkpoints
(`loopjax.checkpoints`). An export folder (written by `loopjax.export`) needs neither loopjax
nor JAX to read:

    OUT/model.safetensors   one tensor per layer and parameter (no stacked axes); never pickle
    OUT/config.json         architecture, loop execution, schedule, tokenizer, parameter report
    OUT/tokenizer/          copies of the tokenizer's files (none for byte/character tokenizers)

Tensor names: Flax parameter paths joined by "." with the stacked `layers` axis split off;
kernels keep Flax's shapes (y = x @ kernel + bias; attention q/k/v D x H x K, out H x K x D):
    embed.embedding (row V = [MASK]), time_embed.fc{1,2}.*, output.{adaln,norm,proj}.*
    layers.<i>.<param>       head layer i in [0, a) or tail layer i in [b, n): ABSOLUTE index i
    loop_block.<j>.<param>   layer j of the looped block (= layer a + j), stored ONCE
    loop_embedding           S_max x D, only with `loop_embedding`
  <param>: adaln.{kernel,bias} (6D: shift1 scale1 gate1 shift2 scale2 gate2), norm_{attn,mlp}.scale,
  attn.{query,key,value,out}.kernel, mlp.{wi,wo}.{kernel,bias} | mlp.{wi_gate,wi_up,wo}.kernel.
Execution (config.json "loop.execution"): head layers, loop_block x S (default S = S_max of
training), tail layers; input re-injection / loop embedding only when the architecture says so.

Loading an export checks the file, names/shapes/dtypes against config.json's architecture and
the recorded SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import safetensors
from flax import traverse_util

from loopjax import storage
from loopjax import checkpoints
from loopjax import config as config_lib
from loopjax.model import LoopedTransformer, ModelConfig, resolve_kernels
from loopjax.model.config import RUNTIME_FIELDS

FORMAT, FORMAT_VERSION = "loopjax-export", 1
WEIGHTS, CONFIG, TOKENIZER_DIR = "model.safetensors", "config.json", "tokenizer"
DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", ml_dtypes.bfloat16)}
_STACKS = ((("head", "scan", "layer"), "head"), (("tail", "scan", "layer"), "tail"),
           (("loop", "scan", "block", "scan", "layer"), "loop"))
_RENAMES = {("loop", "scan", "loop_embedding"): "loop_embedding"}
TENSOR_NAMES = {
    "layers.<i>.*": "head layers [0, a) and tail layers [b, n), absolute layer index i",
    "loop_block.<j>.*": "layer a + j of the looped block: stored once, applied S times",
    "layout": "y = x @ kernel (+ bias); attn q/k/v kernel D x H x K, out H x K x D; adaln: "
              "shift1 scale1 gate1 shift2 scale2 gate2 (output.adaln: shift scale)"}


# ------------------------------------------------------------------------------------------------
# Names: Flax's stacked tree <-> one tensor per layer.

def _names(cfg, path: tuple, shape) -> list[tuple[str, int | None]]:
  """[(export name, index on the leading `layers` axis or None)] of one Flax leaf."""
  for prefix, kind in _STACKS:
    if path[:len(prefix)] == prefix:
      stem, start = {"head": ("layers", 0), "tail": ("layers", cfg.loop_end),
                     "loop": ("loop_block", 0)}[kind]
      rest = ".".join(path[len(prefix):])
      return [(f"{stem}.{start + j}.{rest}", j) for j in range(shape[0])]
  return [(_RENAMES.get(path, ".".join(path)), None)]


def unstack_params(cfg, params) -> dict[str, np.ndarray]:
  """The stacked Flax parameter tree as {export name: per-layer numpy array}."""
  flat = {path: np.asarray(x) for path, x in traverse_util.flatten_dict(nn.unbox(params)).items()}
  return {name: x if j is None else x[j]
          for path, x in flat.items() for name, j in _names(cfg, path, x.shape)}


def abstract_params(model, sharding=None):
  """The model's parameter tree of jax.ShapeDtypeStruct (its own init, no compute), unboxed;
  every leaf gets `sharding` (None: none)."""
  cfg = model.cfg
  tokens = jnp.zeros((1, min(4, cfg.max_length)), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, 1)))
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes["params"])


def expected_tensors(cfg, abstract: dict | None = None) -> dict[str, tuple[int, ...]]:
  """{export name: shape} that the architecture `cfg` needs (abstract: its flat Flax tree)."""
  if abstract is None:
    abstract = traverse_util.flatten_dict(abstract_params(LoopedTransformer(runnable(cfg))))
  return {name: tuple(x.shape if j is None else x.shape[1:])
          for path, x in abstract.items() for name, j in _names(cfg, path, x.shape)}


def _restack(cfg, abstract: dict, tensors: dict, dtype) -> dict:
  """{export name: array} -> the stacked Flax parameter tree (jax arrays of `dtype`)."""
  flat = {}
  for path, x in abstract.items():
    names = _names(cfg, path, x.shape)
    parts = [tensors[n] for n, _ in names]
    flat[path] = jnp.asarray(parts[0] if names[0][1] is None else np.stack(parts), dtype)
  return traverse_util.unflatten_dict(flat)


def file_sha256(path: str) -> str:
  if storage.is_remote(path):
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------------------------------
# An export folder.

def is_export(path: str) -> bool:
  try:
    return json.loads(storage.read_text(storage.join(path, CONFIG))).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def read_export_config(out: str) -> dict:
  path = storage.join(out, CONFIG)
  if not storage.isfile(path):
    raise FileNotFoundError(f"{out} is not a loopjax export: no {CONFIG}")
  try:
    config = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(config, dict) or config.get("format") != FORMAT:
    raise ValueError(f"{path} is not a loopjax export config (format != {FORMAT!r})")
  if int(config.get("format_version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {config['format_version']}; this loopjax reads "
                     f"up to {FORMAT_VERSION}")
  return config


def _read_tensors(out: str, dtype: str) -> dict[str, np.ndarray]:
  path = storage.join(out, WEIGHTS)
  if not storage.isfile(path):
    raise FileNotFoundError(f"{out}: {WEIGHTS} is missing")
  if storage.is_remote(path):  # safetensors reads (memory-maps) a local file
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as local:
      local.write(storage.read_bytes(path))
      local.flush()
      return _read_local_tensors(local.name, path, dtype)
  return _read_local_tensors(path, path, dtype)


def _read_local_tensors(local: str, path: str, dtype: str) -> dict[str, np.ndarray]:
  want = DTYPES[dtype][0]
  try:
    with safetensors.safe_open(local, framework="np") as f:
      bad = {k: d for k in f.keys() if (d := f.get_slice(k).get_dtype()) != want}
      if bad:
        raise ValueError(f"{path}: config.json says {dtype} ({want}) but tensor(s) have other "
                         f"dtypes: {dict(sorted(bad.items())[:5])}")
      return {k: f.get_tensor(k) for k in f.keys()}
  except ValueError:
    raise
  except Exception as e:  # safetensors raises its own error type for every parse failure
    raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted "
                     f"header/data?): {type(e).__name__}: {e}") from None


def _check_tensors(cfg, abstract: dict, tensors: dict, where: str) -> None:
  want = expected_tensors(cfg, abstract)
  missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
  shapes = [f"{k}: file {list(tensors[k].shape)}, architecture {list(want[k])}"
            for k in sorted(set(want) & set(tensors)) if tuple(tensors[k].shape) != want[k]]
  arch = (f"width={cfg.width}, num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, "
          f"loop=[{cfg.loop_start},{cfg.loop_end}), vocab_size={cfg.vocab_size}, "
          f"cond_dim={cfg.cond_dim}, mlp={cfg.mlp_type}")
  problems = [f"{len(missing)} tensor(s) missing from {WEIGHTS}: {missing[:8]}"] * bool(missing)
  problems += [f"{len(extra)} tensor(s) the architecture does not use: {extra[:8]}"] * bool(extra)
  problems += [f"{len(shapes)} tensor(s) with the wrong shape: {shapes[:4]}"] * bool(shapes)
  if problems:
    raise ValueError(f"{where}: {WEIGHTS} does not match the architecture in {CONFIG} "
                     f"({arch}): " + "; ".join(problems))


def load_export(out: str, *, param_dtype: str | None = "float32", verify_checksum: bool = True,
                runtime: dict | None = None):
  """(model, params, export_config) rebuilt from an exported folder alone.

  model: LoopedTransformer of the exported architecture (`model.cfg`); params: the stacked Flax
  tree (unboxed) in `param_dtype` (None: as stored); export_config: config.json as a dict.
  runtime: ModelConfig fields that do not change the weights, e.g. {"max_loops": 24} (the static
  loop length of `model.apply`, to run S > S_max of training; not with `loop_embedding`),
  {"kernels": "xla"} (a cudnn-trained model on CPU), "remat", "loop_remat", "dtype",
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
  tensors = _read_tensors(out, dtype)
  abstract = traverse_util.flatten_dict(abstract_params(LoopedTransformer(runnable(cfg))))
  _check_tensors(cfg, abstract, tensors, out)
  sha = config.get("weights", {}).get("sha256")
  if verify_checksum and sha and file_sha256(os.path.join(out, WEIGHTS)) != sha:
    raise ValueError(f"{os.path.join(out, WEIGHTS)}: SHA-256 differs from the one recorded in "
                     f"{CONFIG} at export: the file was modified or corrupted (pass "
                     "verify_checksum=False to load a deliberately edited file)")
  stored = jnp.float32 if dtype == "float32" else jnp.bfloat16
  params = _restack(cfg, abstract, tensors, jnp.dtype(param_dtype or stored))
  return LoopedTransformer(with_runtime(cfg, runtime)), params, config


def with_runtime(cfg, runtime: dict | None):
  """`cfg` with weight-independent fields replaced (see load_export), validated."""
  runtime = {k: v for k, v in (runtime or {}).items() if getattr(cfg, k, None) != v}
  if set(runtime) - set(RUNTIME_FIELDS) or ("max_loops" in runtime and cfg.loop_embedding):
    raise ValueError(f"runtime may change only {RUNTIME_FIELDS} (max_loops not with "
                     f"loop_embedding), got {runtime}")
  return runnable(type(cfg).from_dict({**dataclasses.asdict(cfg), **runtime}))


def runnable(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with `kernels="auto"` resolved for this process's devices, where the loaded model
  runs (sampling, evaluation, export)."""
  return resolve_kernels(cfg, jax.local_devices())


# ------------------------------------------------------------------------------------------------
# A run's workdir.

def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (loopjax.config.read_config_json), refusing an export."""
  saved = config_lib.read_config_json(workdir)
  if saved.get("format") == FORMAT:
    raise ValueError(f"{workdir} is a `loopjax export` folder, not a training workdir: this "
                     "command needs the run's workdir (sample, eval and analyze read either)")
  return saved


def run_model_config(config) -> ModelConfig:
  """The ModelConfig a run's config describes (loopjax.config.model_config)."""
  return config_lib.model_config(config)


def load_run(workdir: str, *, step: int | None = None, params: str = "ema"):
  """(config, model, params, step) of the newest (or given) checkpoint of a run.

  params: "ema" (EMA weights) or "raw" (the optimizer's current weights); the optimizer state is
  not read. The parameters are placed on this process's first device.
  """
  if params not in checkpoints.PARAMS:
    raise ValueError(f"params must be 'ema' or 'raw', got {params!r}")
  config = read_run_config(workdir)
  model = LoopedTransformer(runnable(run_model_config(config)))
  target = abstract_params(model, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  tree, step = checkpoints.restore_params(storage.join(workdir, "checkpoints"), target,
                                          step=step, params=params)
  if params == "ema":
    warn_young_ema(workdir, step, config.get("train", {}).get("ema_decay"),
                   fix="pass --params raw for the optimizer's weights")
  return config, model, tree, step


_WARNED_EMA: set = set()


def warn_young_ema(path: str, step, decay, *, fix: str) -> bool:
  """Warns (once per folder and step) when EMA weights have averaged fewer than 1/(1 - decay)
  steps: they still weigh the initialisation heavily (a fraction decay**step of it remains), so
  samples and scores of them understate the training."""
  if step is None or decay is None or not 0.0 < float(decay) < 1.0:
    return False
  horizon = 1.0 / (1.0 - float(decay))
  if int(step) >= horizon or (path, int(step)) in _WARNED_EMA:
    return False
  _WARNED_EMA.add((path, int(step)))
  logging.getLogger("loopjax").warning(
      "%s: the EMA weights at step %d have averaged fewer than 1/(1 - ema_decay %g) = %d steps "
      "(%.1f%% of the average is still the initialisation); %s", path, int(step), float(decay),
      round(horizon), 100 * float(decay) ** int(step), fix)
  return True


# ------------------------------------------------------------------------------------------------
# Either.

def load_model_dir(path: str, *, params: str | None = None, step: int | None = None,
                   param_dtype: str | None = "float32", verify_checksum: bool = True,
                   runtime: dict | None = None):
  """(config_like, model, params) from a training workdir or an exported folder.

  model: a LoopedTransformer; `model.cfg` is the authoritative architecture (resolved vocab size,
  max_loops = S_max = default S). params: the stacked Flax tree for `model.apply({"params": p},
  tokens, loops, t, segment_ids)`. config_like: an ml_collections.ConfigDict shaped like a run's
  config (`model`, `loops.train`, `diffusion`, `data`, ...): for a workdir, the run's config; for
  an export, its `training_config` with `data.tokenizer` pointing at the copied tokenizer file (so
  `loopjax.data.tokenizer_for(config_like.data)` works), or, when the export has no training
  config, only `model`, `loops` (train None), `diffusion` and `data.seq_len`/`data.tokenizer`.
  Both get `config_like.source` = {kind: "workdir"|"export", path, params, step}.
  params/step: which checkpoint of a workdir ("ema" default); for an export they must match what
  was exported (or be None). param_dtype, verify_checksum (exports only), runtime: see load_export.
  """
  if not is_export(path):
    config, model, tree, got = load_run(path, step=step, params=params or "ema")
    model = LoopedTransformer(with_runtime(model.cfg, runtime))
    config.source = {"kind": "workdir", "path": storage.resolve(path),
                     "params": params or "ema", "step": int(got)}
    return config, model, tree
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
    warn_young_ema(path, w.get("step"), config.get("train", {}).get("ema_decay"),
                   fix="export the run again with --params raw for the optimizer's weights")
  return config, model, tree
