"""The `loopjax` command explains itself: help on stdout with exit 0, a version, help text on every
flag, one name per meaning (old spellings still accepted, with a note), and no libtpu error lines
on a CPU-only host."""

import argparse
import os
import subprocess
import sys

import pytest
from conftest import FAST_XLA_FLAGS

from loopjax.cli import main
from loopjax.cli.main import parsers
from loopjax.cli.xla_flags import build_parser as xla_flags_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _all_parsers():
  return {**parsers(), "xla_flags": xla_flags_parser()}


def test_every_flag_of_every_subcommand_has_help():
  missing = []
  for command, parser in _all_parsers().items():
    todo = [parser]
    while todo:
      p = todo.pop()
      for action in p._actions:  # pylint: disable=protected-access
        if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
          todo.extend(action.choices.values())
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
          missing.append(f"{command} {name}")
  assert len(_all_parsers()) >= 11
  assert not missing, f"flags without help text: {missing}"


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_top_level_help_goes_to_stdout_and_succeeds(argv, capsys):
  assert main(argv) == 0
  out, err = capsys.readouterr()
  assert not err
  assert "loopjax train --config" in out and "--version" in out
  assert "--step N|best" in out and "datasets:" in out


def test_version_and_unknown_command(capsys):
  from loopjax import __version__
  assert main(["--version"]) == 0
  assert capsys.readouterr().out.strip() == f"loopjax {__version__}"
  assert main(["trian"]) == 2
  out, err = capsys.readouterr()
  assert not out and "unknown command 'trian'" in err


@pytest.mark.parametrize("command", sorted(parsers()))
def test_subcommand_help_goes_to_stdout_and_succeeds(command, capsys):
  with pytest.raises(SystemExit) as e:
    main([command, "--help"] if command != "analyze" else ["analyze", "attention", "--help"])
  out, err = capsys.readouterr()
  assert e.value.code == 0 and not err
  assert out.startswith(f"usage: loopjax {command}")


def test_train_help_documents_the_config_file_and_overrides(capsys):
  with pytest.raises(SystemExit):
    main(["train", "--help"])
  out = capsys.readouterr().out
  assert "--config FILE[:VARIANT]" in out and "--config.SECTION.KEY=VALUE" in out
  assert "loopjax train --config experiments/sudoku.py:loopmdm" in out  # the example


def test_the_example_in_train_help_is_a_valid_config():
  """The overrides of the help's example load (unknown keys or bad values would raise)."""
  from loopjax.cli.config import OVERRIDES_EPILOG
  from loopjax.config.load import load_config
  example = OVERRIDES_EPILOG.split("example:")[1].replace("\\\n", " ").split()
  spec = example[example.index("--config") + 1]
  overrides = [w for w in example if w.startswith("--config.")]
  c = load_config(os.path.join(ROOT, spec), overrides)
  assert c.train.steps == 2000 and c.loops.train == "uniform:1:8"


@pytest.mark.parametrize("command,old,new,dest,value", [
    ("sample", "--num", "--samples", "samples", 3),
    ("sample", "--steps", "--denoising-steps", "denoising_steps", 7),
    ("sample", "--out", "--output-dir", "output_dir", "o"),
    ("eval", "--steps", "--denoising-steps", "denoising_steps", "0,4"),
    ("eval", "--out", "--output-dir", "output_dir", "o"),
    ("analyze", "--out", "--output-dir", "output_dir", "o"),
])
def test_old_spellings_still_work_with_a_one_line_note(command, old, new, dest, value, capsys):
  p = parsers()[command]
  pre = ["attention"] if command == "analyze" else []
  a = p.parse_args([*pre, "--workdir", "w", old, str(value)])
  assert getattr(a, dest) == value
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{old} is deprecated, use {new}" in err
  b = p.parse_args([*pre, "--workdir", "w", new, str(value)])
  assert getattr(b, dest) == value and not capsys.readouterr().err
  default = p.parse_args([*pre, "--workdir", "w"])
  new_action = next(a for a in p._actions if new in a.option_strings)  # pylint: disable=protected-access
  assert getattr(default, dest) == new_action.default  # the old flag adds no default of its own


def test_one_name_per_meaning_across_subcommands():
  """The same flag means the same thing: sample and eval both count rows with --samples and
  denoising steps with --denoising-steps; results go to --output-dir wherever a model is read,
  while --out names the folder a command creates."""
  ps = parsers()
  flags = {c: {o for a in p._actions for o in a.option_strings}  # pylint: disable=protected-access
           for c, p in ps.items()}
  for c in ("sample", "eval"):
    assert {"--samples", "--denoising-steps", "--output-dir", "--loops"} <= flags[c]
  assert {"--output-dir", "--loops"} <= flags["analyze"]
  assert "--out" in flags["export"] and "--out" in flags["prepare"]
  assert "--output-dir" not in flags["export"] | flags["prepare"]


def test_platform_choice_only_without_an_accelerator_or_an_explicit_setting(monkeypatch):
  from loopjax.cli import platforms
  pytest.importorskip("libtpu")
  assert not platforms.has_accelerator(("/nonexistent/accel[0-9]*",))
  env = {}
  monkeypatch.setattr(platforms, "has_accelerator", lambda: False)
  assert platforms.choose(env) == "cpu" and env == {"JAX_PLATFORMS": "cpu"}
  env = {"JAX_PLATFORMS": "tpu"}
  assert platforms.choose(env) is None and env == {"JAX_PLATFORMS": "tpu"}
  monkeypatch.setattr(platforms, "has_accelerator", lambda: True)
  env = {}
  assert platforms.choose(env) is None and env == {}


def _libtpu_lines(stderr: str) -> list[str]:
  keys = ("libtpu", "TPU_", "InitGoogle", "common_lib.cc", "host bounds")
  return [line for line in stderr.splitlines() if any(k in line for k in keys)]


def test_a_cpu_command_prints_no_libtpu_lines(tiny_sudoku_run, tmp_path):
  """With libtpu installed and no TPU here, a command that runs a model on the CPU prints no
  libtpu error lines (a bare `jax.devices()` in the same environment does)."""
  pytest.importorskip("libtpu")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = ROOT
  env["XLA_FLAGS"] = FAST_XLA_FLAGS  # CPU compiler flags only: the session's, for its cache
  bare = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                        capture_output=True, text=True, timeout=120)
  if not _libtpu_lines(bare.stderr):
    pytest.skip("jax prints no libtpu lines on this host: nothing to prevent")
  workdir = tiny_sudoku_run[0]
  proc = subprocess.run(
      [sys.executable, "-m", "loopjax.cli", "sample", "--workdir", workdir, "--samples", "1",
       "--denoising-steps", "2", "--loops", "1", "--output-dir", str(tmp_path / "o")],
      env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert '"loops"' in proc.stdout
  assert not _libtpu_lines(proc.stderr), proc.stderr


def test_the_cli_package_and_top_level_help_import_no_jax():
  code = ("import sys\nfrom loopjax.cli import main\nmain(['--help'])\nmain(['--version'])\n"
          "print('jax' in sys.modules, 'loopjax.train' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[-1] == "False False"


@pytest.mark.parametrize("module", ["loopjax.data.prepare", "loopjax.parallel.xla_flags"])
def test_old_module_entry_points_name_their_replacement(module):
  proc = subprocess.run([sys.executable, "-m", module, "x"], capture_output=True, text=True,
                        timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 2 and not proc.stdout
  assert len(proc.stderr.strip().splitlines()) == 1 and "loopjax.cli." in proc.stderr
