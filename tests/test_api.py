"""The Python API (`loopjax.load`) on a run and on an export: samples print with no warning,
logits at any S (a Python int or a traced one, S > S_max included) equal the independent NumPy
float64 forward pass of the export, the NELBO equals its NumPy value, and a run configured with
kernels bound to other devices (splash) loads, samples, scores and exports on a CPU host."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loopjax
from loopjax import reference
from loopjax.io.export import export_params, export_run
from loopjax.io.load import read_run
from tiny import STEPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tiny_sudoku_copy):
  """A copy of the session's tiny Sudoku run (tests/tiny.py: S ~ U{1..3}, an EMA old enough to
  load with no warning)."""
  return str(tiny_sudoku_copy)


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
  """An export of the run with random weights (a model trained a few steps is near the identity in
  every block, which would hide a wrong loop count)."""
  m = loopjax.load(run, params="raw")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda p: np.asarray(p) + rng.normal(0, 0.3, p.shape).astype(np.float32), m.params)
  out = str(tmp_path_factory.mktemp("api") / "export")
  export_params(out, read_run(run).model, params, run_config=m.config,
                source={"params": "raw", "step": STEPS})
  return out


def _python(code: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=300)


@pytest.mark.parametrize("which", ["run", "export"])
def test_load_and_sample_print_samples_and_no_warning(which, run, export):
  path = {"run": run, "export": export}[which]
  proc = _python(f"import loopjax; m = loopjax.load({path!r}); print(m.sample(2, loops=4))")
  assert proc.returncode == 0, proc.stderr
  assert "--- sample 0" in proc.stdout and "--- sample 1" in proc.stdout
  rows = [line for line in proc.stdout.splitlines() if not line.startswith("---")]
  assert len(rows) == 2 and all(len(r) == 81 and set(r) <= set("123456789") for r in rows)
  assert "warn" not in proc.stderr.lower() and "could not be restored" not in proc.stderr, (
      proc.stderr)


def test_import_loopjax_does_not_import_jax():
  proc = _python("import sys, loopjax; print('jax' in sys.modules, callable(loopjax.load))")
  assert proc.returncode == 0 and proc.stdout.split() == ["False", "True"], proc.stderr


def test_logits_at_any_loops_equal_the_numpy_reference(export):
  m = loopjax.load(export)
  cfg, w = reference.load(export)
  assert m.model_config.max_loops == 3 and m.config.data.source == "sudoku"
  tokens = np.random.default_rng(1).integers(0, m.model_config.vocab_size + 1, (2, 81))
  traced = jax.jit(lambda s: m.logits(tokens, loops=s))
  for s in (1, 3, 5):  # 5 > S_max: no clamp, for an int and a traced S alike
    want = reference.forward(cfg, w, tokens, loops=s)
    got = np.asarray(m.logits(tokens, loops=s))
    assert got.shape == want.shape == (2, 81, m.model_config.vocab_size)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"S={s}")
    np.testing.assert_allclose(np.asarray(traced(jnp.int32(s))), want, rtol=1e-4, atol=1e-4,
                               err_msg=f"traced S={s}")
  assert not np.allclose(reference.forward(cfg, w, tokens, loops=5),
                         reference.forward(cfg, w, tokens, loops=3), atol=1e-3)
  with pytest.raises(ValueError, match="S must be >= 1"):
    m.logits(tokens, loops=0)


def test_nelbo_per_sequence_and_mean_equal_numpy(export):
  """At t = 1 every token is masked and the linear schedule's weight is 1: the NELBO is the
  mean -log p(token | all masked), here from the float64 reference logits."""
  m = loopjax.load(export)
  cfg, w = reference.load(export)
  tokens = np.random.default_rng(2).integers(0, m.model_config.vocab_size, (3, 81))
  masked = np.full_like(tokens, m.model_config.mask_id)
  logits = reference.forward(cfg, w, masked, loops=4)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll_B = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0].mean(-1)
  rows = m.nelbo(tokens, loops=4, time_points=(1.0,), per_sequence=True)
  np.testing.assert_allclose(rows["nats_per_token"], nll_B, rtol=1e-4)
  np.testing.assert_allclose(rows["bits_per_token"], nll_B / math.log(2), rtol=1e-4)
  mean = m.nelbo(tokens, loops=4, time_points=(1.0,))
  assert mean["nats_per_token"] == pytest.approx(nll_B.mean(), rel=1e-4)
  assert mean["ppl_bound"] == pytest.approx(math.exp(nll_B.mean()), rel=1e-4)
  # On the default grid (masks drawn per row), S changes the estimate.
  assert m.nelbo(tokens, loops=1)["nats_per_token"] != m.nelbo(tokens, loops=5)["nats_per_token"]


def test_sample_keeps_the_prompt_and_reports_loops(export):
  m = loopjax.load(export)
  out = m.sample(3, loops=5, steps=4, prompt="123")
  assert len(out) == 3 and out.tokens.shape == (3, 81)
  assert all(t.startswith("123") for t in out.texts)
  assert out.stats["loops_max"] == 5 and out.stats["nfe"] >= 1
  assert m.tokenizer.decode(m.tokenizer.encode("987")) == "987"


@pytest.mark.parametrize("which", ["run", "export"])
def test_a_load_reads_its_tokenizer_once_and_resolves_each_loops_value_once(which, run, export,
                                                                            monkeypatch):
  # Counting spies on the Sudoku tokenizer's constructor (what `DataSpec.tokenizer` reads), on
  # the one `--loops` parser and on the resolve step behind `Loaded.policy`: the load reads its
  # tokenizer once for all its samples, and each `loops=` value is parsed and resolved once.
  from loopjax import loops
  from loopjax.data import sudoku
  from loopjax.loops import LoopPolicy
  from test_resolve import _spy
  tokenizer_reads = _spy(monkeypatch, sudoku, "sudoku_tokenizer")
  resolves = _spy(monkeypatch, loops, "resolve_policy")
  parses, parse = [], LoopPolicy.parse.__func__
  monkeypatch.setattr(LoopPolicy, "parse", classmethod(
      lambda cls, spec, s_max=None: parses.append(str(spec)) or parse(cls, spec, s_max)))
  m = loopjax.load({"run": run, "export": export}[which])
  first = m.sample(2, loops=4, steps=4)
  second = m.sample(1, loops="adaptive:0.05:1:4", steps=4, prompt="12")
  assert len(first) == 2 and len(second) == 1 and second.texts[0].startswith("12")
  assert parses == ["4", "adaptive:0.05:1:4"]
  assert [str(a[1]) for a in resolves] == ["4", "adaptive:0.05:1:4"]
  assert len(tokenizer_reads) == 1, tokenizer_reads
  assert m.tokenizer is m.loaded.tokenizer is m.loaded.data.tokenizer


def test_an_export_records_the_configured_kernels(run, tmp_path):
  """The run says `auto`; this CPU host resolves it to another set, which the export must not
  record (kernels are chosen where the export is loaded)."""
  assert json.load(open(os.path.join(run, "config.json")))["model"]["kernels"] == "auto"
  assert loopjax.load(run).model_config.kernels != "auto"  # resolved for this host
  config = export_run(run, str(tmp_path / "out"))
  assert config["architecture"]["kernels"] == "auto"
  with open(tmp_path / "out" / "config.json", encoding="utf-8") as f:
    assert json.load(f)["architecture"]["kernels"] == "auto"


def test_a_splash_run_samples_scores_and_exports_on_cpu(run, tmp_path, caplog):
  """A run configured for TPU splash attention: on CPU it loads with the reference kernels (one
  info line) and gives the same numbers as the same run configured with the reference."""
  splash = str(tmp_path / "splash_run")
  shutil.copytree(run, splash)
  path = os.path.join(splash, "config.json")
  config = json.load(open(path))
  config["model"]["kernels"] = "splash"
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  caplog.set_level("INFO", logger="loopjax")
  m = loopjax.load(splash)
  assert m.model_config.kernels == "reference"
  notes = [r for r in caplog.records if "kernels=splash" in r.getMessage()]
  assert len(notes) == 1 and notes[0].levelname == "INFO"
  tokens = np.random.default_rng(3).integers(0, m.model_config.vocab_size, (2, 81))
  base = loopjax.load(run)
  np.testing.assert_allclose(np.asarray(m.logits(tokens, loops=2)),
                             np.asarray(base.logits(tokens, loops=2)), rtol=1e-4, atol=1e-5)
  assert np.isfinite(m.nelbo(tokens, loops=2, time_points=2)["nats_per_token"])
  assert len(m.sample(1, loops=2, steps=3)) == 1
  out = str(tmp_path / "splash_export")
  assert export_run(splash, out)["architecture"]["kernels"] == "splash"
  back = loopjax.load(out)
  assert back.model_config.kernels == "reference"
  np.testing.assert_allclose(np.asarray(back.logits(tokens, loops=2)),
                             np.asarray(m.logits(tokens, loops=2)), rtol=1e-5, atol=1e-6)
