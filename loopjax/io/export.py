"""Weights out: a training run's (or any stacked parameter tree's) weights as a self-contained
folder that needs neither loopjax nor JAX to read, and that is a Hugging Face model repository:

  model.safetensors      per-layer tensors, the looped block stored once (export_format.py)
  config.json            loopjax's self-describing config plus `model_type` / `auto_map`
  configuration_loopmdm.py, modeling_loopmdm.py   the PyTorch model (loopjax/hf templates)
  tokenizer.json, tokenizer_config.json, special_tokens_map.json   for AutoTokenizer, with
                         [MASK] = vocab_size (loopjax/hf/tokenizer_files.py)
  tokenizer/             the run's own tokenizer file, as loopjax reads it
  README.md              the model card: Hub metadata from huggingface_hub's card tools (license,
                         language, datasets, model-index of the run's eval/), architecture,
                         loops, training, usage, citation (loopjax/hf/model_card.py)

No absolute local path is written: paths in the training config become file names.
OUT is written to a temporary sibling and renamed into place (complete or absent). A `gs://`
OUT is written to a local temporary folder and uploaded file by file, config.json last: a reader
recognises an export by its config.json, so it sees the folder complete or not at all.
`--push-to-hub ORG/NAME` then uploads the folder as one commit of a Hub model repository
(loopjax/hf/hub.py).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import shutil
import tempfile
import warnings

import numpy as np
from safetensors.numpy import save_file

from loopjax import flops, storage
from loopjax.data import DataSpec, hf_datasets, shards
from loopjax.diffusion import make_schedule
from loopjax.diffusion.samplers import sampler_endpoint
from loopjax.hf import MODEL_TYPE, TEMPLATES, hub, model_card, tokenizer_files
from loopjax.io.export_format import (CONFIG, DTYPES, FORMAT, FORMAT_VERSION, TENSOR_NAMES,
                                      TOKENIZER_DIR, WEIGHTS, file_sha256, unstack_params)
from loopjax.io.load import load_run


# ------------------------------------------------------------------------------------------------
# Export.

def _param_report(cfg, tensors: dict) -> dict:
  """Unique parameters (counted from the tensors) and those of a non-looped model of the same
  executed depth at the default S (loopjax.flops)."""
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


def _strip_path(value: str) -> str:
  """A config string with every absolute local path cut to its file name (comma lists and
  `kind:PATH` tokenizer specs included; URLs kept)."""
  def one(part):
    kind, sep, rest = part.partition(":")
    if sep and kind.isalpha() and len(kind) > 1 and not rest.startswith("//"):
      return f"{kind}:{one(rest)}"
    if os.path.isabs(part) or part.startswith("~"):
      return os.path.basename(part.rstrip("/")) or part
    return part
  return ",".join(one(p) for p in value.split(","))


def relative_paths(obj):
  """`obj` (JSON-like) with absolute local paths reduced to file names (see _strip_path)."""
  if isinstance(obj, dict):
    return {k: relative_paths(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [relative_paths(v) for v in obj]
  return _strip_path(obj) if isinstance(obj, str) else obj


def _training_summary(cfg, run, step) -> dict:
  """The model card's training numbers: data, tokens seen and analytic training FLOPs."""
  if run is None:
    return {}
  d, t = run.data, run.train
  dataset = {"text": d.get("paths"), "prompt_answer": d.get("paths"), "prepared": d.get("path"),
             "tfds": f"{d.get('name')} ({d.get('split')})",
             "sudoku": f"generated puzzles, {d.get('min_givens')}-{d.get('max_givens')} givens",
             "arithmetic": f"generated, up to {d.get('max_digits')} digits, ops "
                           f"{d.get('ops')}"}.get(d.source, d.source)
  out = {"source": d.source, "dataset": relative_paths(str(dataset)),
         "tokenizer": relative_paths(str(d.get("tokenizer"))) if d.source not in (
             "sudoku", "arithmetic") else "built-in characters", "steps": step,
         "batch_size": t.batch_size, "seq_len": d.seq_len, "train_loops": run.loops.train}
  if step is not None:
    out["tokens_seen"] = int(step) * int(t.batch_size) * int(d.seq_len)
    out["train_flops"] = float(step) * flops.expected_train_flops_per_step(
        cfg, int(d.seq_len), int(t.batch_size), run.loops.train if cfg.looped else None)
  return out


def hub_datasets(run) -> list[str]:
  """Hub dataset ids a run was trained on, for the card's `datasets`: the `datasets:` inputs of
  its prepared corpus that name a Hub dataset (local folders are no Hub id)."""
  if run is None or run.data.get("source") != "prepared" or not run.data.get("path"):
    return []
  try:
    manifest = shards.load_manifest(run.data.path)
  except (OSError, ValueError):  # the corpus is not on this machine: nothing to read it from
    return []
  ids = []
  for entry in manifest.get("inputs", []) + manifest.get("heldout_inputs", []):
    path = str(entry.get("path", ""))
    if hf_datasets.is_spec(path):
      name = hf_datasets.parse(path)[0]
      if hub.is_repo_id(name) and name not in ids:
        ids.append(name)
  return ids


def _hf_fields(cfg, dtype: str) -> dict:
  """config.json entries that make the folder a transformers model (remote code)."""
  stem = lambda f: f.removesuffix(".py")
  return {"model_type": MODEL_TYPE, "architectures": ["LoopMDMForMaskedLM"],
          "auto_map": {"AutoConfig": f"{stem(TEMPLATES[0])}.LoopMDMConfig",
                       "AutoModelForMaskedLM": f"{stem(TEMPLATES[1])}.LoopMDMForMaskedLM"},
          "tie_word_embeddings": False, "dtype": dtype}


def export_params(out: str, cfg, params, *, run_config=None, data: DataSpec | None = None,
                  dtype: str = "float32", source: dict | None = None, overwrite: bool = False,
                  eval_summary: dict | None = None, card: dict | None = None) -> dict:
  """Writes OUT from a ModelConfig and its stacked params; returns the config.json written.

  run_config: the run's ConfigDict (tokenizer, noise schedule, loop distribution, training
  settings); without it those entries are null and no tokenizer is written. data: the run's
  DataSpec when the caller holds one (a loaded run's, whose tokenizer is already read; default:
  one made from run_config.data). source: recorded
  under "weights" (params, step). eval_summary: the run's eval/summary.json, tabled in README.md
  and its model-index. card: the card's license / language / datasets (model_card.card_data).
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  np_dtype = DTYPES[dtype][1]
  tensors = {k: np.ascontiguousarray(v.astype(np_dtype))
             for k, v in unstack_params(cfg, params).items()}
  tok, tokenizer, files, schedule, sampling, run = None, None, [], None, None, run_config
  if run is not None:
    tok = (data or DataSpec.load(run.data)).tokenizer
    files = list(tok.files())
    tokenizer = relative_paths({**tok.describe(), "files": [
        f"{TOKENIZER_DIR}/{os.path.basename(f)}" for f in files]})
    sched = make_schedule(run.diffusion)
    schedule = {"schedule": sched.name, "exponent": sched.exponent, "eps": sched.eps}
    sampling = sampler_endpoint(run.diffusion)
  a, b, s = cfg.loop_start, cfg.loop_end, cfg.max_loops if cfg.looped else 1
  config = {
      "format": FORMAT, "format_version": FORMAT_VERSION, **_hf_fields(cfg, dtype),
      "architecture": dataclasses.asdict(cfg), "vocab_size": cfg.vocab_size,
      "input_vocab_size": cfg.vocab_size + 1, "mask_id": cfg.mask_id,
      # The tensors keep loopjax's padded tables (exact round trip); readers slice the logits.
      "vocab_padding": {"multiple": cfg.vocab_multiple, "output_columns": cfg.padded_vocab,
                        "embedding_rows": cfg.input_vocab,
                        "logits": "columns >= vocab_size are padding: sliced off"},
      "loop": {"looped": cfg.looped, "block": [a, b], "block_layers": cfg.block_layers,
               "default_loops": s, "max_train_loops": cfg.max_loops,
               "train_loops": run.loops.train if run is not None else None,
               "input_injection": cfg.loop_inject, "loop_embedding": cfg.loop_embedding,
               "executed_depth_at_default": cfg.executed_depth(s), "execution": _execution(cfg)},
      "tensor_names": TENSOR_NAMES,
      "math": {"layer_norm": {"eps": float(getattr(cfg, "norm_eps", 1e-6)), "bias": False,
                              "stats": "float32"},
               "block": "x += gate1*attn(LN(x)*(1+scale1)+shift1); "
                        "x += gate2*mlp(LN(x)*(1+scale2)+shift2)",
               "mlp": "gelu_tanh" if cfg.mlp_type == "gelu" else "swiglu: silu(gate)*up",
               "rope": {"style": "rotate_half", "base": cfg.rope_base},
               "attention": "softmax(q k^T / sqrt(head_dim)); i sees j iff same segment id > 0 "
                            "or i == j (no segment ids: all)",
               "time_embedding": {"freq_dim": 256, "max_period": 10000.0,
                                  "features": "[cos, sin]", "activation": "silu",
                                  "t_when_unconditioned": 0.0}},
      "noise_schedule": schedule, "sampling": sampling, "tokenizer": tokenizer,
      "weights": {"file": WEIGHTS, "dtype": dtype, "num_tensors": len(tensors),
                  **relative_paths(source or {})},
      "parameter_report": _param_report(cfg, tensors),
      "training_config": relative_paths(json.loads(run.to_json())) if run is not None else None,
  }
  training = _training_summary(cfg, run, (source or {}).get("step"))

  def write(tmp):
    path = os.path.join(tmp, WEIGHTS)
    save_file(tensors, path, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    os.chmod(path, 0o644)
    config["weights"]["sha256"] = file_sha256(path)
    for f in files:
      os.makedirs(os.path.join(tmp, TOKENIZER_DIR), exist_ok=True)
      shutil.copy2(f, os.path.join(tmp, TOKENIZER_DIR, os.path.basename(f)))
    if tok is not None:
      tokenizer_files.write_tokenizer_files(tmp, tok, max_length=cfg.max_length)
    for name in TEMPLATES:
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
        fh.write(importlib.resources.files("loopjax.hf").joinpath(name).read_text("utf-8"))
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as fh:
      json.dump(config, fh, indent=2)
    meta = dict(card or {})
    meta["datasets"] = meta.get("datasets") or hub_datasets(run) or None
    text = model_card.render(config, training, eval_summary, os.path.basename(out.rstrip("/")),
                             **meta)
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
      fh.write(text)
  _write_atomically(out, write, overwrite)
  return config


def _write_atomically(out: str, write, overwrite: bool) -> None:
  """write(tmp) fills a fresh folder that becomes `out` only when complete."""
  out = storage.resolve(out)
  if storage.exists(out) and not overwrite and not (storage.isdir(out) and not storage.listdir(out)):
    raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
  if storage.is_remote(out):
    _upload(out, write)
    return
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


def _upload(out: str, write) -> None:
  """The object-store form of _write_atomically: no folder rename exists, so the old export is
  removed, the files are uploaded, and config.json (what makes it an export) goes last."""
  storage.check_client(out)
  with tempfile.TemporaryDirectory(prefix="loopjax-export-") as tmp:
    write(tmp)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp)
                   for d, _, fs in os.walk(tmp) for f in fs)
    storage.rmtree(out)
    for rel in sorted(files, key=lambda r: r == CONFIG):
      storage.copy_file(os.path.join(tmp, rel), storage.join(out, *rel.split(os.sep)))


def export_run(workdir: str, out: str, *, params: str = "ema", dtype: str = "float32",
               step: int | None = None, overwrite: bool = False,
               card: dict | None = None) -> dict:
  """Exports a training run's checkpoint (EMA or raw params); returns the written config.json."""
  run, _, tree, got = load_run(workdir, step=step, params=params)
  # The architecture records the configured kernel set (e.g. auto), not the one this host
  # resolved it to: kernels are chosen where the export is loaded.
  cfg, config = run.model, run.config
  summary = None
  path = storage.join(workdir, "eval", "summary.json")
  if storage.isfile(path):
    summary = json.loads(storage.read_text(path))
  source = {"params": params, "step": int(got),
            "workdir": storage.basename(storage.resolve(workdir))}
  return export_params(out, cfg, tree, run_config=config, data=run.data, dtype=dtype,
                       overwrite=overwrite, source=source, eval_summary=summary, card=card)


# ------------------------------------------------------------------------------------------------
# What `loopjax export` prints

def format_report(config: dict) -> str:
  r, w = config["parameter_report"], config["weights"]
  return (f"exported {w['num_tensors']} tensors ({w['dtype']}, params={w.get('params')}, "
          f"step={w.get('step')})\n"
          f"unique parameters:                      {r['unique_params']:,}\n"
          f"non-looped model of the executed depth: {r['non_looped_same_depth_params']:,} "
          f"({r['executed_depth']} layers at S={r['default_loops']}; {r['ratio']:.2f}x)")
