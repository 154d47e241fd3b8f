"""Bad input stops with a one-line error that names the problem, never a traceback.

The table runs each class through `loopjax.cli.main` in this process (a clean error = main
returns 2 and prints one `loopjax CMD: error: ...` line); one row also runs as a `python -m
loopjax.cli` subprocess, where the process boundary (exit status, stderr) is what is checked.
"""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from side_effects import snapshot

from loopjax import data as D
from loopjax.io import export
from loopjax.data.tokenizers import make_tokenizer
from loopjax.config.load import load_config
from loopjax.io.export_format import abstract_params
from loopjax.config import model_config
from loopjax.io.load import runnable
from loopjax.model import LoopedTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUDOKU = os.path.join(ROOT, "experiments", "sudoku.py")
TINY = ["--config.model.width=16", "--config.model.num_layers=3", "--config.model.num_heads=2",
        "--config.model.cond_dim=8", "--config.train.batch_size=2", "--config.train.steps=1",
        "--config.variant.s_max=2"]


def _sudoku_cfg():
  cfg = D.default_data_config()
  cfg.update(source="sudoku", seq_len=81)
  return cfg


def test_iterator_state_is_a_copy():
  it = D.make_train_iterator(_sudoku_cfg(), global_batch_size=4, seed=0)
  next(it)
  state = it.get_state()
  state["fingerprint"]["global_batch_size"] = 999
  state["grain"].clear()
  again = it.get_state()
  assert again["fingerprint"]["global_batch_size"] == 4 and again["grain"]
  it.close()


@pytest.mark.parametrize("spec, file, message", [
    ("sentencepiece", "x.model", "is not a SentencePiece model file"),
    ("hf", "tokenizer.json", "is not a Hugging Face tokenizer.json"),
])
def test_corrupt_tokenizer_file(tmp_path, spec, file, message):
  (tmp_path / file).write_text("not a tokenizer")
  with pytest.raises(ValueError, match=message):
    make_tokenizer(f"{spec}:{tmp_path / file}")


# ------------------------------------------------------------------ the CLI table


def _tiny_config():
  return load_config(SUDOKU + ":loopmdm", TINY)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """{name: path}: an export folder of a tiny Sudoku model (zero weights: nothing here reads
  their values), a workdir with a config.json and no checkpoint, a text file."""
  root = tmp_path_factory.mktemp("bad_input")
  config = _tiny_config()
  cfg = model_config(config)
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  abstract_params(LoopedTransformer(runnable(cfg))))
  out = str(root / "export")
  export.export_params(out, cfg, params, run_config=config, source={"params": "ema", "step": 1})
  empty_run = root / "empty_run"
  empty_run.mkdir()
  (empty_run / "config.json").write_text(config.to_json())
  (root / "doc.txt").write_text("some text\n\nmore text\n")
  return {"export": out, "empty_run": str(empty_run), "doc": str(root / "doc.txt"),
          "root": str(root)}


def _damaged_run(tmp, config_text):
  """A workdir whose config.json holds `config_text` and that has a checkpoint folder."""
  os.makedirs(os.path.join(tmp, "run", "checkpoints", "1"))
  with open(os.path.join(tmp, "run", "config.json"), "wb") as f:
    f.write(config_text if isinstance(config_text, bytes) else config_text.encode())


def _incompatible_run(tmp):
  config = load_config(SUDOKU + ":loopmdm", TINY[:1] + ["--config.model.num_layers=4"])
  _damaged_run(tmp, config.to_json())


def _tiny_run(tmp):
  """A workdir of the TINY config with a checkpoint folder holding a file."""
  _damaged_run(tmp, _tiny_config().to_json())
  _write(os.path.join("run", "checkpoints", "1", "state"), b"weights")(tmp)


def _write(name, content):
  def make(tmp):
    with open(os.path.join(tmp, name), "wb") as f:
      f.write(content)
  return make


def _spm_model(tmp):
  _write("x.model", b"not a sentencepiece model")(tmp)


def _truncated_export(tmp, assets):
  import shutil
  shutil.copytree(assets["export"], os.path.join(tmp, "bad_export"))
  path = os.path.join(tmp, "bad_export", "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(40)


TFDS_HINT = "tfds build"  # the command the error prints to prepare the dataset
TEXT = ["--config.data.source=text", "--config.data.seq_len=32", "--config.model.max_length=32",
        "--config.data.eval_examples=1"]

# (class, setup(tmp) or None, argv with {tmp} {export} {empty_run} {doc}, text the error line
# names, or a tuple: its first item on the error line, the others there or in the lines after it)
CASES = [
    ("unknown config key", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", "--config.model.widht=3"], "widht"),
    ("unknown data key", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", "--config.data.pathz=x"], "pathz"),
    ("mistyped config value", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", "--config.train.steps=ten"], "steps"),
    ("missing experiment file", None,
     ["train", "--config", "{tmp}/nope.py", "--workdir", "{tmp}/w"], "nope.py"),
    ("unknown variant", None,
     ["train", "--config", SUDOKU + ":loopmdmm", "--workdir", "{tmp}/w"], "unknown variant"),
    ("loop block outside the layers", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, "--config.variant.block=(1,9)"],
     "block"),
    ("mesh does not divide the devices", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, "--config.mesh.fsdp=3"], "fsdp"),
    ("token ids beyond vocab_size", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, "--config.model.vocab_size=5"],
     "vocab_size"),
    ("missing data file", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, *TEXT,
      "--config.data.paths={tmp}/missing.txt"], "missing.txt"),
    ("empty data file", _write("empty.txt", b""),
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, *TEXT,
      "--config.data.paths={tmp}/empty.txt"], ("empty.txt", "empty")),
    ("non-UTF-8 data file", _write("latin.txt", b"caf\xe9 \xff\xfe\n\nmore\n"),
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, *TEXT,
      "--config.data.paths={tmp}/latin.txt"], ("latin.txt", "UTF-8")),
    ("malformed JSONL data file", _write("bad.jsonl", b'{"text": "a"}\n{"text": \n'),
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, *TEXT,
      "--config.data.paths={tmp}/bad.jsonl"], "bad.jsonl"),
    ("token ids beyond a byte tokenizer's vocab_size",
     _write("doc.txt", b"hello world\n\nmore\n"),
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, *TEXT,
      "--config.data.paths={tmp}/doc.txt", "--config.model.vocab_size=200"],
     ("vocab_size", "256")),
    ("absent TFDS data", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, *TEXT,
      "--config.data.source=tfds", "--config.data.data_dir={tmp}/tfds"],
     ("not prepared", "lm1b", TFDS_HINT)),
    ("sequence longer than the model", None,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/w", *TINY, "--config.model.max_length=40"],
     "max_length"),
    ("incompatible workdir", _incompatible_run,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/run", *TINY], "incompatible run"),
    ("another width than the run's checkpoints", _tiny_run,
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/run", *TINY, "--config.model.width=32"],
     ("incompatible", "model.width")),
    ("corrupt config.json on resume", lambda tmp: _damaged_run(tmp, "{not json"),
     ["train", "--config", SUDOKU, "--workdir", "{tmp}/run", *TINY], "config.json"),
    ("non-UTF-8 config.json for sample", lambda tmp: _damaged_run(tmp, b"\xff\xfe{}"),
     ["sample", "--workdir", "{tmp}/run"], "config.json is damaged"),
    ("config.json not an object", lambda tmp: _damaged_run(tmp, "[1, 2]"),
     ["eval", "--workdir", "{tmp}/run"], "config.json is damaged"),
    ("sample on a missing workdir", None, ["sample", "--workdir", "{tmp}/nope"], "nope"),
    ("eval on a missing workdir", None, ["eval", "--workdir", "{tmp}/nope"], "nope"),
    ("export of a missing workdir", None,
     ["export", "--workdir", "{tmp}/nope", "--out", "{tmp}/o"], "nope"),
    ("export of a run with no checkpoint", None,
     ["export", "--workdir", "{empty_run}", "--out", "{tmp}/o"], "checkpoint"),
    ("export of an export folder", None,
     ["export", "--workdir", "{export}", "--out", "{tmp}/o"], "is a `loopjax export` folder"),
    ("sample --loops negative", None, ["sample", "--workdir", "{export}", "--loops", "-1"],
     "S must be >= 1"),
    ("eval --loops negative", None, ["eval", "--workdir", "{export}", "--loops", "2,-3"],
     "S must be >= 1"),
    ("analyze --loops negative", None,
     ["analyze", "attention", "--workdir", "{export}", "--loops", "-1"], "S must be >= 1"),
    ("analyze --loops a policy", None,
     ["analyze", "attention", "--workdir", "{export}", "--loops", "adaptive:0.1"],
     "fixed loop counts"),
    ("bad adaptive policy", None,
     ["sample", "--workdir", "{export}", "--loops", "adaptive:fast"], "not a number"),
    ("unknown loop policy kind", None,
     ["eval", "--workdir", "{export}", "--loops", "sometimes:3"], "unknown kind"),
    ("adaptive MIN above MAX", None,
     ["sample", "--workdir", "{export}", "--loops", "adaptive:0.1:5:2"], "MIN <= MAX"),
    ("params the export does not hold", None,
     ["sample", "--workdir", "{export}", "--params", "raw"], "params='ema'"),
    ("truncated export weights", _truncated_export,
     ["sample", "--workdir", "{tmp}/bad_export"], "model.safetensors"),
    ("prompt longer than the row", None,
     ["sample", "--workdir", "{export}", "--prompt", "123456789", "--length", "4"],
     "--length 4"),
    ("eval --denoising-steps not numbers", None,
     ["eval", "--workdir", "{export}", "--denoising-steps", "4,eight"], "--denoising-steps"),
    ("missing tokenizer file", None,
     ["prepare", "--input", "{doc}", "--tokenizer", "sentencepiece:{tmp}/none.model",
      "--out", "{tmp}/p"], "none.model"),
    ("unknown tokenizer kind", None,
     ["prepare", "--input", "{doc}", "--tokenizer", "wordpiece:x", "--out", "{tmp}/p"],
     "wordpiece"),
    ("missing GSM8K file", None,
     ["eval", "--workdir", "{export}", "--no-nelbo", "--no-tasks", "--gsm8k", "{tmp}/gsm.jsonl"],
     "gsm.jsonl"),
    ("missing zero-shot corpus", None,
     ["eval", "--workdir", "{export}", "--no-nelbo", "--no-tasks", "--corpus", "{tmp}/c.txt"],
     "c.txt"),
    ("bad --mesh spec", None, ["memory", "--config", SUDOKU, "--mesh", "data=two"], "data=two"),
    ("unknown --mesh axis", None, ["memory", "--config", SUDOKU, "--mesh", "dta=1"], "dta"),
    ("prepare on a missing input", None,
     ["prepare", "--input", "{tmp}/absent.txt", "--out", "{tmp}/p"], "absent.txt"),
    ("corrupt SentencePiece .model", _spm_model,
     ["prepare", "--input", "{doc}", "--tokenizer", "sentencepiece:{tmp}/x.model",
      "--out", "{tmp}/p"], "is not a SentencePiece model file"),
    ("spm-train on a missing input", None,
     ["spm-train", "--input", "{tmp}/absent.txt", "--prefix", "{tmp}/spm"], "absent.txt"),
    ("flops with an unknown key", None, ["flops", "--config", SUDOKU, "--config.modle.width=8"],
     "modle"),
]


# Data is read once the run's config.json is written, so these leave that file in the new
# workdir (and nothing else).
READ_AFTER_CONFIG = {"missing data file", "empty data file", "non-UTF-8 data file",
                     "malformed JSONL data file", "absent TFDS data"}


def _argv(argv, tmp, assets):
  return [a.format(tmp=tmp, **assets) for a in argv]


@pytest.mark.parametrize("name, setup, argv, names", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input(name, setup, argv, names, tmp_path, assets, capsys, monkeypatch):
  """Exit 2, one error line naming the problem, no traceback, at once, and nothing written: no
  new output or corpus, an existing run's files (its checkpoints) byte for byte as they were."""
  from loopjax.cli import main

  monkeypatch.delenv("LOOPJAX_DEBUG", raising=False)
  tmp = str(tmp_path)
  if setup is _truncated_export:
    setup(tmp, assets)
  elif setup is not None:
    setup(tmp)
  before = snapshot(tmp)
  capsys.readouterr()
  t0 = time.perf_counter()
  try:
    rc = main(_argv(argv, tmp, assets))
  except SystemExit as e:  # argparse-style exits print their one line themselves
    rc = e.code
  seconds = time.perf_counter() - t0
  err = capsys.readouterr().err
  assert rc == 2, (rc, err[-2000:])
  lines = [ln for ln in err.splitlines() if ln.startswith(f"loopjax {argv[0]}: error:")]
  assert len(lines) == 1, err[-2000:]
  first, *rest = (names,) if isinstance(names, str) else names
  assert first in lines[0], lines[0]
  tail = err[err.index(lines[0]):]
  assert all(n in tail for n in rest), tail
  assert "Traceback" not in err
  assert seconds < 60, seconds  # e.g. absent data fails at once, with no retries
  after = snapshot(tmp)
  assert {k: after.get(k, "removed") for k in before} == before, "an existing file changed"
  new = sorted(set(after) - set(before))
  assert new == (["w", "w/config.json"] if name in READ_AFTER_CONFIG else []), new


def test_process_exit_status_and_one_error_line(tmp_path):
  """As a process: exit status 2 and one error line, no traceback."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("LOOPJAX_DEBUG", None)
  proc = subprocess.run([sys.executable, "-m", "loopjax.cli", "sample", "--workdir",
                         str(tmp_path / "nope")], capture_output=True, text=True, timeout=120,
                        env=env, cwd=ROOT)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("loopjax sample: error: ")
  assert "nope" in proc.stderr


def test_debug_re_raises(tmp_path, monkeypatch):
  """LOOPJAX_DEBUG=1: the error propagates out of main (a process prints its traceback)."""
  from loopjax.cli import main
  monkeypatch.setenv("LOOPJAX_DEBUG", "1")
  with pytest.raises(FileNotFoundError, match="nope"):
    main(["sample", "--workdir", str(tmp_path / "nope")])


# ------------------------------------------------------------------ --loops, cost, outputs


def test_loops_zero_and_max_mean_s_max_everywhere():
  from loopjax.loops import LoopPolicy

  got = [LoopPolicy.parse(s, 6) for s in ("0", "max", " MAX ", "3", "fixed:9", "adaptive:0.1")]
  assert [str(p) for p in got] == ["6", "6", "6", "3", "fixed:9", "adaptive:0.1"]
  assert [p.loops for p in got[:5]] == [6, 6, 6, 3, 9] and got[5].max_loops == 6
  for bad in ("-1", "fixed:-2"):
    with pytest.raises(ValueError, match="S must be >= 1"):
      LoopPolicy.parse(bad, 6)


def test_large_loop_counts_warn_with_the_cost(caplog):
  from loopjax.evaluate.loop_cost import loop_bound, warn_loop_cost
  from loopjax.flops import inference_flops_per_sample

  cfg = model_config(_tiny_config())
  assert loop_bound(2) == 16 and loop_bound(100) == 256
  assert warn_loop_cost(cfg, 16, length=81, calls=4) is None
  msg = warn_loop_cost(cfg, 100000, length=81, calls=4, samples=2, device="tpu v5e")
  assert f"{inference_flops_per_sample(cfg, 81, 100000, 4):.2e} FLOPs per sample" in msg
  assert "S = 100000" in msg and "at least" in msg and msg in caplog.text


def test_sample_warns_of_the_cost_before_it_compiles(assets, caplog, monkeypatch):
  from loopjax.cli import sample as sample_command
  from loopjax.inference import generate

  class Stop(Exception):
    pass

  def no_compile(*args, **kwargs):
    raise Stop

  monkeypatch.setattr(generate, "make_sampler", no_compile)
  with pytest.raises(Stop):
    sample_command.main(["--workdir", assets["export"], "--loops", "100000", "--samples", "1"])
  assert "S = 100000" in caplog.text and "FLOPs per sample" in caplog.text


def test_outputs_go_beside_an_export_folder(assets, tmp_path):
  from loopjax.evaluate.outputs import output_dir

  assert output_dir(assets["export"]) == assets["export"] + ".outputs"
  assert output_dir(assets["export"] + "/") == assets["export"] + ".outputs"
  assert output_dir(assets["empty_run"]) == assets["empty_run"]
  assert output_dir(assets["export"], str(tmp_path)) == str(tmp_path)
