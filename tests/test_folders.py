"""Every command that writes into a folder refuses one that belongs to something else (an export,
a prepared corpus, a study, an eval output folder, a run) with one line and leaves it
byte-for-byte as it was; and bad input (batch size, eval files, judge folder) stops with exit 2
and one line before anything compiles.

Commands run through `loopjax.cli.main` in this process; one subprocess checks the process
boundary (exit status and stderr of a real `loopjax train`)."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from side_effects import Compiles, snapshot

from loopjax import folders
from loopjax.io import export
from loopjax.model import LoopedTransformer
from loopjax.config.load import load_config
from loopjax.io.export_format import abstract_params
from loopjax.config import model_config
from loopjax.io.load import runnable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUDOKU = os.path.join(ROOT, "experiments", "sudoku.py")
TINY = ["--config.model.width=16", "--config.model.num_layers=3", "--config.model.num_heads=2",
        "--config.model.cond_dim=8", "--config.train.batch_size=2", "--config.train.steps=1",
        "--config.variant.s_max=2"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
  """{kind: folder} of one folder of every kind, each made by (or with the files of) the command
  that writes it."""
  from loopjax.cli import main
  root = tmp_path_factory.mktemp("folders")
  config = load_config(SUDOKU + ":loopmdm", TINY)
  cfg = model_config(config)
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  abstract_params(LoopedTransformer(runnable(cfg))))
  out = {"export": str(root / "export")}
  export.export_params(out["export"], cfg, params, run_config=config,
                       source={"params": "ema", "step": 1})
  (root / "doc.txt").write_text("some text to tokenize\n\nand a second document\n" * 20)
  out["prepared"] = str(root / "corpus")
  assert main(["prepare", "--input", str(root / "doc.txt"), "--tokenizer", "byte",
               "--out", out["prepared"], "--heldout", "0.5", "--workers", "1"]) == 0
  # What `loopjax eval --out DIR` writes: eval/*.json (+ .md/.tex tables) and plots/.
  out["outputs"] = str(root / "eval_out")
  os.makedirs(os.path.join(out["outputs"], "eval"))
  os.makedirs(os.path.join(out["outputs"], "plots"))
  for name in ("summary.json", "tasks.json"):
    (root / "eval_out" / "eval" / name).write_text(json.dumps({"rows": []}))
  (root / "eval_out" / "plots" / "eval_exact_match_vs_loops.png").write_bytes(b"\x89PNG")
  # What `loopjax study` writes at its end: study.json, study.md, plots/, runs/.
  out["study"] = str(root / "study")
  os.makedirs(os.path.join(out["study"], "runs", "mdm"))
  (root / "study" / "study.json").write_text(json.dumps({"preset": "tiny"}))
  (root / "study" / "study.md").write_text("# study\n")
  # A run: its config.json and a checkpoint folder.
  out["run"] = str(root / "run")
  os.makedirs(os.path.join(out["run"], "checkpoints", "1"))
  (root / "run" / "config.json").write_text(config.to_json())
  out["doc"] = str(root / "doc.txt")
  return out


def test_kind_of_reads_the_files_each_command_writes(kinds, tmp_path):
  for kind in folders.KINDS:
    assert folders.kind_of(kinds[kind])[0] == kind, kind
  assert folders.kind_of(str(tmp_path / "absent")) == (None, None)
  (tmp_path / "notes.txt").write_text("mine")
  assert folders.kind_of(str(tmp_path)) == (None, None)  # someone's own files: anyone's folder
  # A Hugging Face model folder from elsewhere is an export too.
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  assert folders.kind_of(str(hf)) == ("export", "config.json")


def _refused(argv, folder, capsys, names):
  from loopjax.cli import main
  before = snapshot(folder)
  capsys.readouterr()
  rc = main(argv)
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.startswith(f"loopjax {argv[0]}: error:")]
  assert rc == 2 and len(lines) == 1, err[-2000:]
  assert names in lines[0] and "nothing was written" in lines[0], lines[0]
  assert snapshot(folder) == before


@pytest.mark.parametrize("kind, names", [("export", "is a model export"),
                                         ("prepared", "is a prepared corpus"),
                                         ("outputs", "is an eval/sample output folder"),
                                         ("study", "is a study")])
def test_train_refuses_a_folder_of_another_kind(kinds, kind, names, capsys, monkeypatch):
  monkeypatch.delenv("LOOPJAX_DEBUG", raising=False)
  _refused(["train", "--config", SUDOKU, "--workdir", kinds[kind], *TINY], kinds[kind], capsys,
           names)


@pytest.mark.parametrize("argv, target, names", [
    (["prepare", "--input", "{doc}", "--tokenizer", "byte", "--out", "{run}"], "run",
     "is a training run"),
    (["prepare", "--input", "{doc}", "--tokenizer", "byte", "--out", "{export}"], "export",
     "is a model export"),
    (["export", "--workdir", "{run}", "--out", "{prepared}", "--overwrite"], "prepared",
     "is a prepared corpus"),
    (["export", "--workdir", "{run}", "--out", "{run}", "--overwrite"], "run",
     "is a training run"),
    (["eval", "--workdir", "{export}", "--out", "{prepared}"], "prepared", "is a prepared corpus"),
    (["sample", "--workdir", "{export}", "--out", "{study}"], "study", "is a study"),
    (["analyze", "attention", "--workdir", "{export}", "--out", "{export}"], "export",
     "is a model export"),
    (["study", "--workdir", "{run}", "--preset", "tiny"], "run", "is a training run"),
], ids=["prepare>run", "prepare>export", "export>corpus", "export>run", "eval>corpus",
        "sample>study", "analyze>export", "study>run"])
def test_other_writers_refuse_too(kinds, argv, target, names, capsys, monkeypatch):
  monkeypatch.delenv("LOOPJAX_DEBUG", raising=False)
  _refused([a.format(**kinds) for a in argv], kinds[target], capsys, names)


@pytest.mark.parametrize("argv, names", [
    (["train", "--config", SUDOKU, "--workdir", "{tmp}/w", "--config.train.batch_size=0"],
     "train.batch_size must be >= 1, got 0"),
    (["train", "--config", SUDOKU, "--workdir", "{tmp}/w", "--config.train.stepz=3"],
     'unknown config key "stepz" in --config.train.stepz=3: Did you mean "steps"'),
    (["flops", "--config", SUDOKU, "--config.data.seq_len=0"], "data.seq_len must be >= 1"),
    # Held-out NELBO and tasks are on: the missing file must stop the command before them.
    (["eval", "--workdir", "{export}", "--gsm8k", "{tmp}/MISSING.jsonl", "--out", "{tmp}/o"],
     "MISSING.jsonl"),
    (["eval", "--workdir", "{export}", "--gen-ppl", "{tmp}/no_judge", "--out", "{tmp}/o"],
     "no_judge"),
    (["eval", "--workdir", "{export}", "--corpus", "{tmp}/c.txt", "--out", "{tmp}/o"], "c.txt"),
    (["eval", "--workdir", "{export}", "--examples", "0"], "--examples must be >= 1, got 0"),
    (["sample", "--workdir", "{export}", "--out", "{export}"], "is a model export"),
], ids=["batch_size=0", "mistyped key", "flops seq_len=0", "missing gsm8k", "missing judge",
        "missing corpus", "eval examples=0", "sample into the export"])
def test_bad_input_stops_before_any_compile(kinds, argv, names, tmp_path, capsys, monkeypatch):
  from loopjax.cli import main
  monkeypatch.delenv("LOOPJAX_DEBUG", raising=False)
  argv = [a.format(tmp=tmp_path, **kinds) for a in argv]
  capsys.readouterr()
  t0 = time.perf_counter()
  with Compiles() as compiles:
    rc = main(argv)
  seconds = time.perf_counter() - t0
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.startswith(f"loopjax {argv[0]}: error:")]
  assert rc == 2 and len(lines) == 1, err[-2000:]
  assert names in lines[0], lines[0]
  assert "Traceback" not in err and "\\n" not in lines[0] and "['" not in lines[0], lines[0]
  assert compiles.count == 0, compiles.events
  assert seconds < 10, seconds
  assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "w")


def test_train_batch_size_zero_as_a_process(tmp_path):
  """A real `loopjax train`: exit status 2 and one stderr line, nothing written."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("LOOPJAX_DEBUG", None)
  proc = subprocess.run([sys.executable, "-m", "loopjax.cli", "train", "--config", SUDOKU,
                         "--workdir", str(tmp_path / "w"), "--config.train.batch_size=0"],
                        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
  errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
  assert proc.returncode == 2 and errors == [
      "loopjax train: error: train.batch_size must be >= 1, got 0: set "
      "--config.train.batch_size to a positive integer"], proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")


def test_ema_initialisation_share_equals_the_product_of_the_decays():
  """init_share = prod_{n=1..N} d_n (float64 NumPy), with and without MDLM's warm-up;
  is_young: below 1/(1 - decay) steps without warm-up, a share above 1/e with it."""
  from loopjax.ema import init_share, is_young
  for d in (0.5, 0.9, 0.99, 0.9999):
    for steps in (0, 1, 2, 7, 79, 80, 81, 1000, 30000):
      n = np.arange(1, steps + 1, dtype=np.float64)
      want = np.prod(np.minimum(d, (1 + n) / (10 + n)))
      np.testing.assert_allclose(init_share(steps, d, True), want, rtol=1e-9, atol=1e-300)
      np.testing.assert_allclose(init_share(steps, d, False), d ** steps, rtol=1e-12)
  assert is_young(99, 0.99, False) and not is_young(100, 0.99, False)
  assert is_young(0, 0.99, True) and not is_young(1, 0.99, True)  # 2/11 < 1/e after one update


def test_young_ema_weights_warn_once_naming_params_raw(kinds, caplog):
  """EMA weights that have averaged fewer than 1/(1 - decay) steps are mostly the
  initialisation: loading them says so once per folder and step; older ones load silently."""
  from loopjax.io.load import load_model_dir, warn_young_ema
  assert warn_young_ema("/r", 131, 0.9999, fix="pass --params raw")
  assert "98.7% of the EMA weights at step 131 is still the initialisation" in caplog.text
  assert "10000 steps" in caplog.text and "--params raw" in caplog.text
  assert not warn_young_ema("/r", 131, 0.9999, fix="pass --params raw")  # once
  assert not warn_young_ema("/r", 100, 0.99, fix="")  # 1/(1 - 0.99) = 100 steps averaged
  assert not warn_young_ema("/r", 5, None, fix="")  # no decay known: nothing to say
  # MDLM's warm-up forgets the initialisation within the first updates: nothing to warn of.
  assert not warn_young_ema("/w", 131, 0.9999, fix="", warmup=True)
  caplog.clear()
  load_model_dir(kinds["export"])  # EMA weights of step 1, ema_decay 0.99
  load_model_dir(kinds["export"])
  warnings = [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()]
  assert len(warnings) == 1 and "export the run again with --params raw" in warnings[0]
