"""Weights out (and back in): a self-contained folder that needs neither loopjax nor JAX to read.

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

OUT is written to a temporary sibling and renamed into place (complete or absent). Loading checks
the file, names/shapes/dtypes against config.json's architecture and the recorded SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings

import numpy as np

FORMAT, FORMAT_VERSION = "loopjax-export", 1
WEIGHTS, CONFIG, TOKENIZER_DIR = "model.safetensors", "config.json", "tokenizer"
_DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", None)}  # None: ml_dtypes bf16
_STACKS = ((("head", "scan", "layer"), "head"), (("tail", "scan", "layer"), "tail"),
           (("loop", "scan", "block", "scan", "layer"), "loop"))
_RENAMES = {("loop", "scan", "loop_embedding"): "loop_embedding"}
_TENSOR_NAMES = {
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
  import flax.linen as nn
  from flax import traverse_util
  flat = {path: np.asarray(x) for path, x in traverse_util.flatten_dict(nn.unbox(params)).items()}
  return {name: x if j is None else x[j]
          for path, x in flat.items() for name, j in _names(cfg, path, x.shape)}


def _abstract_params(cfg) -> dict:
  """{Flax path: ShapeDtypeStruct} of the architecture (the model's own init, no compute)."""
  import flax.linen as nn
  import jax
  from flax import traverse_util
  from loopjax.model import LoopedTransformer
  tokens = jax.numpy.zeros((1, min(4, cfg.max_length)), "int32")
  shapes = jax.eval_shape(lambda: LoopedTransformer(cfg).init(jax.random.PRNGKey(0), tokens, 1))
  return traverse_util.flatten_dict(nn.unbox(shapes["params"]))


def expected_tensors(cfg, abstract: dict | None = None) -> dict[str, tuple[int, ...]]:
  """{export name: shape} that the architecture `cfg` needs."""
  return {name: tuple(x.shape if j is None else x.shape[1:])
          for path, x in (abstract or _abstract_params(cfg)).items()
          for name, j in _names(cfg, path, x.shape)}


def _restack(cfg, abstract: dict, tensors: dict, dtype) -> dict:
  """{export name: array} -> the stacked Flax parameter tree (jax arrays of `dtype`)."""
  import jax.numpy as jnp
  from flax import traverse_util
  flat = {}
  for path, x in abstract.items():
    names = _names(cfg, path, x.shape)
    parts = [tensors[n] for n, _ in names]
    flat[path] = jnp.asarray(parts[0] if names[0][1] is None else np.stack(parts), dtype)
  return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------------------------
# Export.

def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _param_report(cfg, tensors: dict) -> dict:
  """Unique parameters (counted from the tensors) and those of a non-looped model of the same
  executed depth at the default S (loopjax.flops)."""
  from loopjax import flops
  unique, report = int(sum(t.size for t in tensors.values())), flops.param_report(cfg)
  if report["unique_params"] != unique:  # an accounting bug somewhere; the tensors are the truth
    warnings.warn(f"flops.param_report: {report['unique_params']} params, tensors: {unique}")
  s = cfg.max_loops if cfg.looped else 1
  equiv = flops.executed_depth_params_for(cfg, s)
  return {"unique_params": unique, "default_loops": s, "executed_depth": cfg.executed_depth(s),
          "non_looped_same_depth_params": equiv, "ratio": equiv / unique,
          "breakdown": report["breakdown"], "non_looped_params_by_loops": {
              str(k): v for k, v in report["executed_depth_params"].items()}}


def _execution(cfg) -> list[str]:
  span = lambda stem, lo, hi: f"{stem}.{lo}" if lo == hi else f"{stem}.{lo}..{hi}"
  a, b, n = (cfg.loop_start, cfg.loop_end, cfg.num_layers) if cfg.looped else (cfg.num_layers,) * 3
  steps = ["c = time_embed(t if time_conditioning else 0)", "h = embed(tokens)"]
  steps += [f"h = {span('layers', 0, a - 1)}(h, c)"] * (a > 0)
  if cfg.looped:
    x = "h" + " + h0" * cfg.loop_inject + " + loop_embedding[min(i, S_max-1)]" * cfg.loop_embedding
    steps += ["h0 = h", f"for i in 0..S-1: h = {span('loop_block', 0, b - a - 1)}({x}, c)"]
  steps += [f"h = {span('layers', b, n - 1)}(h, c)"] * (b < n)
  return steps + ["logits = output(h, c)"]


def export_params(out: str, cfg, params, *, run_config=None, dtype: str = "float32",
                  source: dict | None = None, overwrite: bool = False) -> dict:
  """Writes OUT from a ModelConfig and its stacked params; returns the config.json written.

  run_config: the run's ConfigDict (tokenizer, noise schedule, loop distribution, training
  settings); without it those entries are null. source: recorded under "weights" (params, step).
  """
  from safetensors.numpy import save_file
  if dtype not in _DTYPES:
    raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  np_dtype = _DTYPES[dtype][1] or __import__("ml_dtypes").bfloat16
  tensors = {k: np.ascontiguousarray(v.astype(np_dtype))
             for k, v in unstack_params(cfg, params).items()}
  tokenizer, files, schedule, run = None, [], None, run_config
  if run is not None:
    from loopjax.data import tokenizer_for
    from loopjax.diffusion import make_schedule
    tok = tokenizer_for(run.data)
    files = list(tok.files())
    tokenizer = {**tok.describe(), "files": [f"{TOKENIZER_DIR}/{os.path.basename(f)}"
                                             for f in files]}
    sched = make_schedule(run.diffusion)
    schedule = {"schedule": sched.name, "exponent": sched.exponent, "eps": sched.eps}
  a, b, s = cfg.loop_start, cfg.loop_end, cfg.max_loops if cfg.looped else 1
  config = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "architecture": dataclasses.asdict(cfg), "vocab_size": cfg.vocab_size,
      "input_vocab_size": cfg.vocab_size + 1, "mask_id": cfg.mask_id,
      "loop": {"looped": cfg.looped, "block": [a, b], "block_layers": cfg.block_layers,
               "default_loops": s, "max_train_loops": cfg.max_loops,
               "train_loops": run.loops.train if run is not None else None,
               "input_injection": cfg.loop_inject, "loop_embedding": cfg.loop_embedding,
               "executed_depth_at_default": cfg.executed_depth(s), "execution": _execution(cfg)},
      "tensor_names": _TENSOR_NAMES,
      "math": {"layer_norm": {"eps": 1e-6, "bias": False, "stats": "float32"},
               "block": "x += gate1*attn(LN(x)*(1+scale1)+shift1); "
                        "x += gate2*mlp(LN(x)*(1+scale2)+shift2)",
               "mlp": "gelu_tanh" if cfg.mlp_type == "gelu" else "swiglu: silu(gate)*up",
               "rope": {"style": "rotate_half", "base": cfg.rope_base},
               "attention": "softmax(q k^T / sqrt(head_dim)); i sees j iff same segment id > 0 "
                            "or i == j (no segment ids: all)",
               "time_embedding": {"freq_dim": 256, "features": "[cos, sin]", "activation": "silu",
                                  "t_when_unconditioned": 0.0}},
      "noise_schedule": schedule, "tokenizer": tokenizer,
      "weights": {"file": WEIGHTS, "dtype": dtype, "num_tensors": len(tensors), **(source or {})},
      "parameter_report": _param_report(cfg, tensors),
      "training_config": json.loads(run.to_json()) if run is not None else None,
  }

  def write(tmp):
    path = os.path.join(tmp, WEIGHTS)
    save_file(tensors, path, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    os.chmod(path, 0o644)
    config["weights"]["sha256"] = _sha256(path)
    for f in files:
      os.makedirs(os.path.join(tmp, TOKENIZER_DIR), exist_ok=True)
      shutil.copy2(f, os.path.join(tmp, TOKENIZER_DIR, os.path.basename(f)))
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as fh:
      json.dump(config, fh, indent=2)
  _write_atomically(out, write, overwrite)
  return config


def _write_atomically(out: str, write, overwrite: bool) -> None:
  """write(tmp) fills a fresh sibling folder that is renamed to `out` only when complete."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite and not (os.path.isdir(out) and not os.listdir(out)):
    raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
  old = tmp + "-old"
  try:
    write(tmp)
    os.chmod(tmp, 0o755)
    if os.path.exists(out):  # replacing: move the old folder aside, then swap
      os.rename(out, old)
    os.rename(tmp, out)
  except BaseException:
    if os.path.exists(old) and not os.path.exists(out):
      os.rename(old, out)  # put the previous export back
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(old, ignore_errors=True)


def export_run(workdir: str, out: str, *, params: str = "ema", dtype: str = "float32",
               step: int | None = None, overwrite: bool = False) -> dict:
  """Exports a training run's checkpoint (EMA or raw params); returns the written config.json."""
  from loopjax.evaluate.load import load_run
  config, model, tree, got = load_run(workdir, step=step, params=params)
  return export_params(out, model.cfg, tree, run_config=config, dtype=dtype, overwrite=overwrite,
                       source={"params": params, "step": int(got),
                               "workdir": os.path.abspath(workdir)})


# ------------------------------------------------------------------------------------------------
# Loading back.

def read_export_config(out: str) -> dict:
  path = os.path.join(out, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{out} is not a loopjax export: no {CONFIG}")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(config, dict) or config.get("format") != FORMAT:
    raise ValueError(f"{path} is not a loopjax export config (format != {FORMAT!r})")
  if int(config.get("format_version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {config['format_version']}; this loopjax reads "
                     f"up to {FORMAT_VERSION}")
  return config


def _read_tensors(out: str, dtype: str) -> dict[str, np.ndarray]:
  import safetensors
  path = os.path.join(out, WEIGHTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{out}: {WEIGHTS} is missing")
  want = _DTYPES[dtype][0]
  try:
    with safetensors.safe_open(path, framework="np") as f:
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
  {"kernels": "reference"} (a cudnn-trained model on CPU), "remat", "loop_remat", "dtype",
  "scan_unroll", "unroll_layers".
  """
  import jax.numpy as jnp
  from loopjax.model import LoopedTransformer, ModelConfig
  config = read_export_config(out)
  try:
    cfg = ModelConfig.from_dict(config["architecture"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{os.path.join(out, CONFIG)}: bad architecture: {e}") from None
  dtype = config.get("weights", {}).get("dtype", "float32")
  if dtype not in _DTYPES:
    raise ValueError(f"{os.path.join(out, CONFIG)}: unknown weights dtype {dtype!r}")
  tensors = _read_tensors(out, dtype)
  abstract = _abstract_params(cfg)
  _check_tensors(cfg, abstract, tensors, out)
  sha = config.get("weights", {}).get("sha256")
  if verify_checksum and sha and _sha256(os.path.join(out, WEIGHTS)) != sha:
    raise ValueError(f"{os.path.join(out, WEIGHTS)}: SHA-256 differs from the one recorded in "
                     f"{CONFIG} at export: the file was modified or corrupted (pass "
                     "verify_checksum=False to load a deliberately edited file)")
  stored = jnp.float32 if dtype == "float32" else jnp.bfloat16
  params = _restack(cfg, abstract, tensors, jnp.dtype(param_dtype or stored))
  return LoopedTransformer(with_runtime(cfg, runtime)), params, config


RUNTIME_FIELDS = ("max_loops", "kernels", "remat", "loop_remat", "dtype", "scan_unroll",
                  "unroll_layers")


def with_runtime(cfg, runtime: dict | None):
  """`cfg` with weight-independent fields replaced (see load_export), validated."""
  runtime = {k: v for k, v in (runtime or {}).items() if getattr(cfg, k, None) != v}
  if set(runtime) - set(RUNTIME_FIELDS) or ("max_loops" in runtime and cfg.loop_embedding):
    raise ValueError(f"runtime may change only {RUNTIME_FIELDS} (max_loops not with "
                     f"loop_embedding), got {runtime}")
  return type(cfg).from_dict({**dataclasses.asdict(cfg), **runtime})


def is_export(path: str) -> bool:
  try:
    with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


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
  import ml_collections
  from loopjax.model import LoopedTransformer
  if not is_export(path):
    from loopjax.evaluate.load import load_run
    config, model, tree, got = load_run(path, step=step, params=params or "ema")
    model = LoopedTransformer(with_runtime(model.cfg, runtime))
    config.source = {"kind": "workdir", "path": os.path.abspath(path),
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
    config.data.tokenizer = f"{kind}:{os.path.join(os.path.abspath(path), tok['files'][0])}"
  config.source = {"kind": "export", "path": os.path.abspath(path),
                   "params": w.get("params"), "step": w.get("step")}
  return config, model, tree


# ------------------------------------------------------------------------------------------------
# CLI: loopjax export --workdir DIR --out OUT [--params ema|raw] [--dtype ...] [--step N]

def format_report(config: dict) -> str:
  r, w = config["parameter_report"], config["weights"]
  return (f"exported {w['num_tensors']} tensors ({w['dtype']}, params={w.get('params')}, "
          f"step={w.get('step')})\n"
          f"unique parameters:                      {r['unique_params']:,}\n"
          f"non-looped model of the executed depth: {r['non_looped_same_depth_params']:,} "
          f"({r['executed_depth']} layers at S={r['default_loops']}; {r['ratio']:.2f}x)")


def export_main(argv) -> int:
  import argparse
  p = argparse.ArgumentParser(prog="loopjax export",
                              description="write a run's weights as safetensors + config.json")
  p.add_argument("--workdir", required=True, help="training run folder")
  p.add_argument("--out", required=True, help="output folder (written atomically)")
  p.add_argument("--params", choices=("ema", "raw"), default="ema")
  p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  args = p.parse_args(argv)
  config = export_run(args.workdir, args.out, params=args.params, dtype=args.dtype,
                      step=args.step, overwrite=args.overwrite)
  print(f"{os.path.abspath(args.out)}\n{format_report(config)}")
  return 0
