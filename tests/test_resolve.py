"""One resolve step: a prepared-data training run loads its tokenizer and corpus manifest once,
parses loops.train once, and its config.json keeps the configured kernels (auto) while the step
runs the kernel set resolved for its devices."""

import json
import os
import sys

import pytest
from test_prepare import _corpus_dir

from loopjax import loops
from loopjax.config import from_config, load_config
from loopjax.data import shards, tokenizers
from loopjax.data.prepare import prepare
from loopjax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spy(monkeypatch, module, name: str) -> list:
  """Counts calls of `module.name` through every loopjax module that holds it."""
  original, calls = getattr(module, name), []

  def counted(*a, **k):
    calls.append(a)
    return original(*a, **k)

  for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("loopjax") and getattr(mod, name, None) is original:
      monkeypatch.setattr(mod, name, counted)
  return calls


@pytest.fixture
def corpus(tmp_path):
  raw, _ = _corpus_dir(tmp_path, files=1, per_file=60)
  out = str(tmp_path / "corpus")
  prepare([raw], "byte", out, heldout=0.1, progress=False)
  return out


def test_a_prepared_data_run_loads_its_tokenizer_and_manifest_once(monkeypatch, tmp_path, corpus):
  tokenizer_loads = _spy(monkeypatch, tokenizers, "make_tokenizer")
  manifest_loads = _spy(monkeypatch, shards, "load_manifest")
  loop_parses = []
  parse = loops.LoopDistribution.parse.__func__
  monkeypatch.setattr(loops.LoopDistribution, "parse", classmethod(
      lambda cls, spec: loop_parses.append(spec) or parse(cls, spec)))
  config = load_config(os.path.join(ROOT, "experiments", "owt.py") + ":loopmdm", [
      f"--config.data.path={corpus}", "--config.data.tokenizer=byte",
      "--config.data.seq_len=32", "--config.data.prefetch=0", "--config.model.max_length=32",
      "--config.model.width=32", "--config.model.num_layers=3", "--config.model.num_heads=2",
      "--config.model.cond_dim=16", "--config.model.dtype=float32", "--config.model.remat=none",
      "--config.loops.train=uniform:1:3", "--config.train.batch_size=4",
      "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=2",
      "--config.train.eval_batches=1", "--config.train.eval_time_points=2",
      "--config.train.async_checkpoints=False", "--config.train.writers=jsonl"])
  # The variant's FLOP matching (load_config) parses its candidate distributions; from here
  # loops.train is parsed once, by the resolve step, and training reuses run.loops.
  derived = len(loop_parses)
  run = from_config(config)
  out = train(run, str(tmp_path / "run"))
  assert len(tokenizer_loads) == 1, tokenizer_loads
  assert len(manifest_loads) == 1, manifest_loads
  assert loop_parses[derived:] == ["uniform:1:3"], loop_parses[derived:]
  assert out["metrics"]["step"] == 2 and run.model.max_loops == 3
  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["model"]["kernels"] == "auto", "config.json keeps the configured kernels"
  assert out["model"].cfg.kernels == "xla_cpu", "the CPU step runs the kernels auto picks there"


def test_flops_of_a_gpt2_config_reads_no_tokenizer(monkeypatch, capsys):
  # owt.py configures vocab_size and a GPT-2 tokenizer file that is absent here: the FLOP count
  # needs only the model, so the resolved run's data must not read its tokenizer or manifest.
  from loopjax.cli.flops import flops_main
  tokenizer_loads = _spy(monkeypatch, tokenizers, "make_tokenizer")
  manifest_loads = _spy(monkeypatch, shards, "load_manifest")
  flops_main(["--config", os.path.join(ROOT, "experiments", "owt.py") + ":loopmdm", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert tokenizer_loads == [] and manifest_loads == [], (tokenizer_loads, manifest_loads)
  assert out["max_loops"] == 12 and out["expected_loops"] == 6.5, out


def test_the_data_of_a_run_is_read_once_on_first_use(monkeypatch, tmp_path, corpus):
  tokenizer_loads = _spy(monkeypatch, tokenizers, "make_tokenizer")
  manifest_loads = _spy(monkeypatch, shards, "load_manifest")
  run = from_config(load_config(os.path.join(ROOT, "experiments", "owt.py") + ":loopmdm", [
      f"--config.data.path={corpus}", "--config.data.tokenizer=byte"]))
  assert tokenizer_loads == [] and manifest_loads == []
  run.check_data()
  assert run.data.manifest is run.data.manifest and run.data.tokenizer is run.data.tokenizer
  assert len(tokenizer_loads) == 1 and len(manifest_loads) == 1, (tokenizer_loads, manifest_loads)
  too_small = from_config(load_config(os.path.join(ROOT, "experiments", "owt.py") + ":loopmdm", [
      f"--config.data.path={corpus}", "--config.data.tokenizer=byte",
      "--config.model.vocab_size=100"]))
  with pytest.raises(ValueError, match="model.vocab_size is 100: set model.vocab_size >= "):
    too_small.check_data()
