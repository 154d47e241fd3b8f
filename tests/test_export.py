"""Export to safetensors + config.json and back: exact round trip, an independent NumPy forward
from the folder alone, refusal of damaged or mismatched files, atomic writes, the CLI on a real
(tiny, trained in-process) run, and the parameter report."""

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file, save_file

from loopjax import cli
from loopjax.io import checkpoints, export, export_format, load
from loopjax import reference as ref
from loopjax.model import LoopedTransformer, ModelConfig
from loopjax.config.base import base_config, model_config
from word_tokenizer import word_level_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=9, max_length=16, width=32, num_layers=3, num_heads=2, cond_dim=16)
CONFIGS = {
    "loopmdm": ModelConfig(kernels="reference", **TINY, loop_start=1, loop_end=2, max_loops=3),
    "mdm": ModelConfig(kernels="reference", **TINY),  # the same size, no looped block
    # uniform looping (no head, no tail), input injection, loop embedding, SwiGLU, time input
    "variant": ModelConfig(kernels="reference",
                           **TINY, loop_start=0, loop_end=3, max_loops=3, loop_inject=True,
                           loop_embedding=True, mlp_type="swiglu", time_conditioning=True),
}
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 10)  # includes [MASK] = 9
SEGMENTS = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
T = jnp.array([0.3, 0.8])


def _random_params(cfg, seed=0):
  """Random parameters of the model's shapes. Not the init: adaLN gates start at zero there, so
  blocks would be identity maps; here every gate, norm scale and bias is random too."""
  shapes = jax.eval_shape(lambda: LoopedTransformer(cfg).init(jax.random.PRNGKey(0), TOKENS, 1))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    shape = x.shape[1:] if any(k in ("head", "tail", "block") for k in keys) else x.shape
    if keys[-1] == "kernel":  # fan-in scaled; attn.out contracts over heads x head_dim
      fan_in = shape[0] * (shape[1] if keys[-2] == "out" and len(shape) == 3 else 1)
      return jnp.asarray(rng.normal(0, fan_in ** -0.5, x.shape), jnp.float32)
    base = 1.0 if keys[-1] == "scale" else 0.0
    sd = 1.0 if keys[-1] == "embedding" else 0.2
    return jnp.asarray(base + rng.normal(0, sd, x.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def _run_config(cfg, tok_path):
  c = base_config()
  c.model.update({k: v for k, v in dataclasses.asdict(cfg).items() if k in c.model})
  c.loops.train = f"uniform:1:{cfg.max_loops}"
  c.data.update(source="text", tokenizer=f"hf:{tok_path}", seq_len=cfg.max_length)
  c.diffusion.schedule = "cosine"
  return c


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  words = ["<unk>", "<pad>", "</s>", "a", "b", "c", "d", "e", "f"]  # 9 ids, as vocab_size
  return word_level_tokenizer(tmp_path_factory.mktemp("tok"), words)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hf_tokenizer):
  """name -> (model, params, OUT folder) for every config in CONFIGS (float32 export)."""
  out = {}
  for name, cfg in CONFIGS.items():
    params = _random_params(cfg)
    d = str(tmp_path_factory.mktemp("exports") / name)
    export.export_params(d, cfg, params, run_config=_run_config(cfg, hf_tokenizer),
                         source={"params": "ema", "step": 7})
    out[name] = (LoopedTransformer(cfg), params, d)
  return out


def _logits(model, params, loops, segments=None, t=None):
  fn = jax.jit(model.apply, static_argnums=2)
  return np.asarray(fn({"params": params}, TOKENS, loops, t, segments))


@pytest.mark.parametrize("name", ["loopmdm", "mdm"])
def test_round_trip_gives_the_same_params_and_logits(exported, name):
  model, params, d = exported[name]
  model2, params2, conf = load.load_export(d)
  assert model2.cfg == model.cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  s = model.cfg.max_loops
  want = _logits(model, params, s, SEGMENTS)
  got = _logits(model2, params2, s, SEGMENTS)
  diff = np.abs(got - want).max()
  print(f"{name}: round-trip max |diff| = {diff:.3g}")
  assert diff <= 1e-5
  assert conf["loop"]["default_loops"] == s and conf["mask_id"] == 9


@pytest.mark.parametrize("name,loops,segments,t", [
    ("loopmdm", 3, True, False), ("loopmdm", 3, False, False), ("loopmdm", 1, False, False),
    ("mdm", 1, True, False), ("mdm", 1, False, False), ("variant", 2, True, True)])
def test_numpy_reference_reproduces_jax_from_the_folder_alone(exported, name, loops, segments,
                                                               t):
  model, params, d = exported[name]
  seg, times = (SEGMENTS if segments else None), (T if t else None)
  want = _logits(model, params, loops, seg, times)
  cfg, w = ref.load(d)
  got = ref.forward(cfg, w, np.asarray(TOKENS), loops, None if times is None else np.asarray(T),
                    None if seg is None else np.asarray(SEGMENTS))
  diff = np.abs(got - want).max()
  print(f"{name} S={loops} seg={segments} t={t}: NumPy max |diff| = {diff:.3g} "
        f"(logit scale {np.abs(want).max():.3g})")
  assert diff < 1e-4
  if name == "loopmdm" and loops == 3:  # the loop matters: S = 1 gives other logits
    other = ref.forward(cfg, w, np.asarray(TOKENS), 1, None,
                        None if seg is None else np.asarray(SEGMENTS))
    assert np.abs(other - got).max() > 0.1


def test_more_loops_than_training_through_runtime_max_loops(exported):
  _, _, d = exported["loopmdm"]  # S_max = 3
  model, params, _ = load.load_export(d, runtime={"max_loops": 5})
  cfg, w = ref.load(d)
  want = ref.forward(cfg, w, np.asarray(TOKENS), 5)
  assert np.abs(_logits(model, params, 5) - want).max() < 1e-4
  with pytest.raises(ValueError, match="runtime may change only"):
    load.load_export(d, runtime={"width": 64})


def test_numpy_reference_runs_without_jax_or_loopjax(exported, tmp_path):
  """In a fresh interpreter: only the folder, NumPy and safetensors; JAX never gets imported."""
  model, params, d = exported["loopmdm"]
  np.save(tmp_path / "tokens.npy", np.asarray(TOKENS))
  code = ("import sys, numpy as np; from loopjax import reference as r; "
          f"np.save({str(tmp_path / 'logits.npy')!r}, r.forward(*r.load({d!r}), "
          f"np.load({str(tmp_path / 'tokens.npy')!r}))); "
          "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'loopjax') and "
          "m not in ('loopjax', 'loopjax.reference')]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path))
  got = np.load(tmp_path / "logits.npy")
  assert np.abs(got - _logits(model, params, 3)).max() < 1e-4


def test_tensor_names_and_config(exported):
  _, _, d = exported["loopmdm"]
  names = set(load_file(os.path.join(d, "model.safetensors")))
  assert {"layers.0.attn.query.kernel", "loop_block.0.attn.query.kernel",
          "layers.2.mlp.wi.kernel", "embed.embedding", "output.proj.bias"} <= names
  assert not any(n.startswith(("layers.1.", "loop_block.1.")) for n in names)  # stored once
  conf = json.load(open(os.path.join(d, "config.json")))
  assert conf["architecture"] == dataclasses.asdict(CONFIGS["loopmdm"])
  assert conf["loop"]["block"] == [1, 2] and conf["loop"]["train_loops"] == "uniform:1:3"
  assert conf["noise_schedule"]["schedule"] == "cosine"
  assert conf["tokenizer"]["type"] == "hf" and conf["tokenizer"]["files"] == [
      "tokenizer/tokenizer.json"]
  assert os.path.isfile(os.path.join(d, "tokenizer", "tokenizer.json"))
  # load_model_dir: a run-shaped config whose tokenizer is the copied file.
  loaded = load.load_model_dir(d)
  config = loaded.config
  assert config.data.tokenizer == f"hf:{os.path.join(d, 'tokenizer', 'tokenizer.json')}"
  assert config.source.kind == "export" and config.source.step == 7
  assert loaded.tokenizer.encode("a b") == [3, 4]
  with pytest.raises(ValueError, match="holds params='ema'"):
    load.load_model_dir(d, params="raw")


def test_parameter_report(exported):
  reports = {n: json.load(open(os.path.join(d, "config.json")))["parameter_report"]
             for n, (_, _, d) in exported.items()}
  loop, mdm = reports["loopmdm"], reports["mdm"]
  assert loop["unique_params"] == mdm["unique_params"]  # looping adds no parameters
  counted = sum(x.size for x in jax.tree_util.tree_leaves(exported["loopmdm"][1]))
  assert loop["unique_params"] == counted
  # S = 3 runs 1 + 3*1 + 1 = 5 layers; a plain 5-layer model has 2 more layers' parameters.
  five = sum(np.prod(s) for s in export_format.expected_tensors(ModelConfig(kernels="reference",
                                                                            **{**TINY,
                                                                        "num_layers": 5})).values())
  assert loop["executed_depth"] == 5 and loop["non_looped_same_depth_params"] == five
  assert mdm["non_looped_same_depth_params"] == mdm["unique_params"]


def test_bfloat16_export(exported, tmp_path):
  model, params, _ = exported["loopmdm"]
  d = str(tmp_path / "bf16")
  export.export_params(d, model.cfg, params, dtype="bfloat16")
  with safetensors.safe_open(os.path.join(d, "model.safetensors"), "np") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  _, params2, conf = load.load_export(d)
  assert conf["weights"]["dtype"] == "bfloat16"
  rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, rounded)
  got = ref.forward(*ref.load(d), np.asarray(TOKENS), 3)  # the NumPy reference decodes bf16
  assert np.abs(got - _logits(model, params2, 3)).max() < 1e-4
  assert np.abs(got - _logits(model, params, 3)).max() > 1e-4  # it really was rounded
  assert jax.tree_util.tree_leaves(load.load_export(d, param_dtype=None)[1])[0].dtype == \
      jnp.bfloat16
  # No training config was given: load_model_dir returns what the folder has.
  loaded = load.load_model_dir(d)
  config, model = loaded.config, loaded.model
  assert config.loops.train is None and config.model.width == 32 and not config.diffusion.keys()
  assert config.source.kind == "export" and model.cfg.max_loops == 3


def _edit_tensors(d, fn):
  path = os.path.join(d, "model.safetensors")
  save_file(fn(load_file(path)), path)


def _flip_header_byte(d):
  path = os.path.join(d, "model.safetensors")
  raw = bytearray(open(path, "rb").read())
  n = struct.unpack("<Q", raw[:8])[0]
  i = 8 + raw[8:8 + n].index(b'"dtype"')  # break the JSON header itself
  raw[i] ^= 0xFF
  open(path, "wb").write(bytes(raw))


def _rewrite(d, name, fn):
  path = os.path.join(d, name)
  data = open(path, "rb").read()
  open(path, "wb").write(fn(data))


def _edit_config(d, fn):
  path = os.path.join(d, "config.json")
  conf = json.load(open(path))
  fn(conf)
  json.dump(conf, open(path, "w"))


DAMAGE = {
    "truncated": (lambda d: _rewrite(d, "model.safetensors", lambda b: b[:len(b) // 2]),
                  "not a readable safetensors file"),
    "header_size_flipped": (lambda d: _rewrite(d, "model.safetensors",
                                               lambda b: bytes([b[0] ^ 0x5A]) + b[1:]),
                            "not a readable safetensors file"),
    "header_byte_flipped": (_flip_header_byte, "not a readable safetensors file"),
    "data_byte_flipped": (lambda d: _rewrite(d, "model.safetensors",
                                             lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:]),
                          "SHA-256 differs"),
    "wrong_shape": (lambda d: _edit_tensors(d, lambda t: {
        **t, "loop_block.0.mlp.wi.kernel": t["loop_block.0.mlp.wi.kernel"][:, :64].copy()}),
        r"wrong shape.*loop_block\.0\.mlp\.wi\.kernel: file \[32, 64\], architecture \[32, 128\]"),
    "missing_tensor": (lambda d: _edit_tensors(d, lambda t: {
        k: v for k, v in t.items() if k != "layers.2.norm_mlp.scale"}),
        r"missing from model\.safetensors: \['layers\.2\.norm_mlp\.scale'\]"),
    "extra_tensor": (lambda d: _edit_tensors(d, lambda t: {
        **t, "layers.1.attn.query.kernel": t["layers.0.attn.query.kernel"]}),
        r"does not use: \['layers\.1\.attn\.query\.kernel'\]"),
    "wrong_width": (lambda d: _edit_config(d, lambda c: c["architecture"].update(width=48)),
                    r"does not match the architecture in config\.json \(width=48.*wrong shape"),
    "wrong_dtype": (lambda d: _edit_config(d, lambda c: c["weights"].update(dtype="bfloat16")),
                    "config.json says bfloat16"),
    "not_an_export": (lambda d: _edit_config(d, lambda c: c.pop("format")),
                      "not a loopjax export"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_or_mismatched_exports_are_refused(exported, tmp_path, damage):
  src = exported["loopmdm"][2]
  d = str(tmp_path / "copy")
  shutil.copytree(src, d)
  load.load_export(d)  # the intact copy loads
  fn, message = DAMAGE[damage]
  fn(d)
  with pytest.raises(ValueError, match=message) as err:
    load.load_export(d)
  print(f"{damage}: {err.value}")


def test_export_is_atomic(exported, tmp_path, monkeypatch):
  model, params, _ = exported["mdm"]
  out = tmp_path / "out"
  calls = []

  def boom(*a, **k):
    calls.append(1)
    raise OSError("disk full")

  monkeypatch.setattr(export, "file_sha256", boom)  # fails after the weights are written
  with pytest.raises(OSError, match="disk full"):
    export.export_params(str(out), model.cfg, params)
  assert calls and not out.exists() and os.listdir(tmp_path) == []  # no half export, no temp dir
  monkeypatch.undo()
  export.export_params(str(out), model.cfg, params)
  before = open(out / "config.json").read()
  with pytest.raises(ValueError, match="already exists"):
    export.export_params(str(out), model.cfg, params, dtype="bfloat16")
  assert open(out / "config.json").read() == before
  export.export_params(str(out), model.cfg, params, dtype="bfloat16", overwrite=True)
  assert json.load(open(out / "config.json"))["weights"]["dtype"] == "bfloat16"
  assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.fixture(scope="module")
def trained(tiny_sudoku_run):
  """(workdir, what train returned, config) of the tiny Sudoku LoopMDM run of 3 steps
  (tests/tiny.py: layer 1 of 3 looped, S ~ U{1..3})."""
  return tiny_sudoku_run


@pytest.fixture(scope="module")
def workdir(trained):
  return trained[0]


def test_a_run_loads_its_weights_without_the_optimizer(trained):
  """EMA and raw weights read from the checkpoint alone equal the trained state's, in the model
  that training built; a checkpoint of another architecture is refused by name."""
  d, out, config = trained
  _, model, ema, step = load.load_run(d)
  assert step == 3 and model.cfg == load.runnable(model_config(config)) == out["model"].cfg
  state = jax.device_get(out["state"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(ema), state.ema_params)
  raw = load.load_run(d, params="raw")[2]
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(raw), state.params)
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(ema),
                                                       jax.tree_util.tree_leaves(raw))) > 0
  wider = LoopedTransformer(dataclasses.replace(model.cfg, width=64))
  target = export_format.abstract_params(wider, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  with pytest.raises(ValueError, match="checkpoint 3 .* does not match this model"):
    checkpoints.restore_params(os.path.join(d, "checkpoints"), target)


def test_cli_export_of_a_trained_run(workdir, tmp_path, capsys):
  out = str(tmp_path / "export")
  assert cli.main(["export", "--workdir", workdir, "--out", out, "--step", "2"]) == 2
  assert "no checkpoint 2" in capsys.readouterr().err and not os.path.exists(out)
  assert cli.main(["export", "--workdir", workdir, "--out", out, "--params", "raw"]) == 0
  printed = capsys.readouterr().out
  conf = json.load(open(os.path.join(out, "config.json")))
  rep = conf["parameter_report"]
  assert f"unique parameters:                      {rep['unique_params']:,}" in printed
  assert f"{rep['non_looped_same_depth_params']:,}" in printed
  assert conf["weights"]["params"] == "raw" and conf["weights"]["step"] == 3
  assert conf["loop"]["default_loops"] == 3 and rep["executed_depth"] == 3 + 2
  assert conf["tokenizer"]["type"] == "chars" and conf["training_config"]["data"]["source"] == \
      "sudoku"
  # Workdir and export load through the same entry point and give the same logits.
  run_loaded, exp_loaded = load.load_model_dir(workdir, params="raw"), load.load_model_dir(out)
  run_cfg, run_model, run_params = run_loaded.config, run_loaded.model, run_loaded.params
  exp_cfg, exp_model, exp_params = exp_loaded.config, exp_loaded.model, exp_loaded.params
  assert run_model.cfg == exp_model.cfg and run_cfg.source.kind == "workdir"
  assert exp_cfg.diffusion.schedule == run_cfg.diffusion.schedule
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 81), 0, 10)
  fn = jax.jit(lambda p: exp_model.apply({"params": p}, tokens, 3))  # the same model (cfg ==)
  a, b = fn(run_params), fn(exp_params)
  diff = float(jnp.abs(a - b).max())
  cfg, w = ref.load(out)
  np_diff = np.abs(ref.forward(cfg, w, np.asarray(tokens)) - np.asarray(a)).max()
  print(f"trained run: round-trip max |diff| = {diff:.3g}, NumPy max |diff| = {np_diff:.3g}")
  assert diff <= 1e-5 and np_diff < 1e-4
