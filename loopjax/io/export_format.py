"""The export format, both directions: Flax's stacked parameter tree <-> one named tensor per
layer, and reading an export folder's config and tensors back (checked against the
architecture). `loopjax.io.export` writes the folder; `loopjax.io.load` rebuilds a model from it.
An export folder needs neither loopjax nor JAX to read:

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
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
from flax import traverse_util

from loopjax import storage
from loopjax.model import LoopedTransformer

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
    # Shapes do not depend on the kernel set: the reference one builds on every host.
    model = LoopedTransformer(dataclasses.replace(cfg, kernels="reference"))
    abstract = traverse_util.flatten_dict(abstract_params(model))
  return {name: tuple(x.shape if j is None else x.shape[1:])
          for path, x in abstract.items() for name, j in _names(cfg, path, x.shape)}


def restack(cfg, abstract: dict, tensors: dict, dtype) -> dict:
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


def read_tensors(out: str, dtype: str) -> dict[str, np.ndarray]:
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


def check_tensors(cfg, abstract: dict, tensors: dict, where: str) -> None:
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
