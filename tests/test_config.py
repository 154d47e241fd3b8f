"""Reading experiments: overrides first, then the variant's derived values; one grammar for S."""

import ast
import json
import logging
import os

import pytest

from loopjax import flops as F
from loopjax.loops import LoopPolicy
from loopjax.inference.denoiser import loop_args
from loopjax.loops import LoopDistribution, resolve_policy, split_specs
from loopjax.model import ModelConfig
from loopjax.config.base import model_config
from loopjax.config.load import load_config, split_config_args
from loopjax.config.variants import VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWT = os.path.join(ROOT, "experiments", "owt.py")
SUDOKU = os.path.join(ROOT, "experiments", "sudoku.py")
PAPER = dict(vocab_size=50258, vocab_multiple=128, max_length=1024, width=768, num_heads=12,
             cond_dim=128, dropout=0.0, dtype="bfloat16", remat="dots_no_batch")


def _owt_steps(num_layers, loops="uniform:1:12", block=(1, 3)):
  """FLOP-matched steps of an owt LoopMDM against the same-depth MDM, straight from flops."""
  base = ModelConfig(kernels="reference", **PAPER, num_layers=num_layers)
  dist = LoopDistribution.parse(loops)
  loop = ModelConfig(kernels="reference",
                     **PAPER, num_layers=num_layers, loop_start=block[0], loop_end=block[1],
                     max_loops=dist.max_loops)
  return round(F.matched_steps(loop, dist, base, None, 1_000_000, 1024, 512))


def test_paper_variants_resolve_to_the_paper_numbers():
  got = {v: load_config(f"{OWT}:{v}") for v in VARIANTS}
  assert got["mdm"].train.steps == 1_000_000 and not model_config(got["mdm"]).looped
  assert got["loopmdm"].train.steps == _owt_steps(12) == 599_500
  assert (got["loopmdm"].model.loop_start, got["loopmdm"].model.loop_end) == (1, 3)
  assert got["loopmdm"].loops.train == "uniform:1:12"
  assert got["deep_mdm"].model.num_layers == 23 and got["deep_mdm"].train.steps == 599_500
  assert got["mdm_matched"].train.steps == 599_500
  assert got["mdm_matched"].model.num_layers == 12
  u = got["uniform_loop"]
  assert (u.model.loop_start, u.model.loop_end, u.loops.train) == (0, 12, "uniform:1:3")


def test_override_re_derives_the_flop_matched_steps(caplog):
  caplog.set_level(logging.INFO)
  c = load_config(f"{OWT}:loopmdm", ["--config.model.num_layers=24"])
  assert c.model.num_layers == 24
  assert c.train.steps == _owt_steps(24) != _owt_steps(12)
  assert f"train.steps = {_owt_steps(24)}" in caplog.text
  assert "re-derived for model.num_layers=24" in caplog.text
  assert c.to_json().count(str(_owt_steps(24))) == 1  # what config.json holds
  # A derivation input the variant reads (S_max) re-derives the steps too.
  c = load_config(f"{OWT}:loopmdm", ["--config.variant.s_max=4"])
  assert c.loops.train == "uniform:1:4" and c.train.steps == _owt_steps(12, "uniform:1:4")


def test_the_cli_logs_the_derived_values(capsys, caplog):
  from loopjax.cli import main
  caplog.set_level(logging.INFO)
  assert main(["flops", "--config", f"{SUDOKU}:loopmdm", "--config.model.num_layers=3",
               "--json"]) == 0
  steps = json.loads(capsys.readouterr().out)["steps"]
  assert steps == load_config(f"{SUDOKU}:loopmdm", ["--config.model.num_layers=3"]).train.steps
  logged = "\n".join(f"{r.levelname} {r.getMessage()}" for r in caplog.records)
  assert (f"INFO train.steps = {steps} (FLOP-matched to mdm's 1000 steps; re-derived for "
          "model.num_layers=3)") in logged
  assert "INFO loops.train = uniform:1:6 (loopmdm: block [1, 2) looped" in logged


def test_explicit_derived_keys_keep_the_override(caplog):
  caplog.set_level(logging.INFO)
  c = load_config(f"{OWT}:loopmdm", ["--config.train.steps=100"])
  assert c.train.steps == 100
  assert "kept from --config.train.steps; loopmdm would derive 599500" in caplog.text
  # An overridden loop distribution is used by the derivations that follow it.
  c = load_config(f"{OWT}:loopmdm", ["--config.loops.train=uniform:1:3"])
  assert c.loops.train == "uniform:1:3" and c.train.steps == _owt_steps(12, "uniform:1:3")
  # deep_mdm: the user's depth stands; the steps are LoopMDM's for that base depth.
  c = load_config(f"{OWT}:deep_mdm", ["--config.model.num_layers=24"])
  assert c.model.num_layers == 24 and c.train.steps == _owt_steps(24)


def test_variant_by_override_and_unknown_variant():
  a = load_config(f"{SUDOKU}:loopmdm", ["--config.variant.name=deep_mdm"])
  b = load_config(f"{SUDOKU}:deep_mdm")
  assert a.to_json() == b.to_json()
  for spec, extra in ((f"{SUDOKU}:loopmbd", []), (SUDOKU, ["--config.variant.name=loopmbd"])):
    with pytest.raises(ValueError, match="unknown variant 'loopmbd'; choose one of mdm, "
                                         "loopmdm, deep_mdm, uniform_loop, mdm_matched"):
      load_config(spec, extra)
  with pytest.raises(ValueError, match="variant.baseline_steps .* must be >= 1, got 0"):
    load_config(SUDOKU, ["--config.variant.baseline_steps=0"])
  with pytest.raises(ValueError, match="stepz"):
    load_config(SUDOKU, ["--config.train.stepz=3"])
  with pytest.raises(FileNotFoundError, match="path.py"):
    load_config(os.path.join(ROOT, "experiments", "nope.py"))


def test_empty_variant_leaves_the_config_as_written():
  c = load_config(SUDOKU, ["--config.variant.name=", "--config.train.steps=7"])
  assert c.train.steps == 7 and c.loops.train == "fixed:1" and c.model.loop_end == 0


def test_eval_loops_is_a_deprecated_name_of_loops_eval(caplog):
  with caplog.at_level(logging.WARNING, logger="loopjax"):
    c = load_config(SUDOKU, ["--config.eval.loops=5"])
  assert c.loops.eval == 5 and c.eval.loops == 0
  assert "eval.loops is deprecated: set loops.eval=5" in caplog.text
  assert load_config(SUDOKU, ["--config.loops.eval=4"]).loops.eval == 4
  with pytest.raises(ValueError, match="eval.loops=5 and loops.eval=4 disagree"):
    load_config(SUDOKU, ["--config.eval.loops=5", "--config.loops.eval=4"])


def test_split_config_args():
  spec, overrides, rest = split_config_args(
      ["--workdir", "w", "--config", "a.py:x", "--config.train.steps", "5",
       "--config.model.width=8", "--json"])
  assert (spec, overrides, rest) == ("a.py:x", ["--config.train.steps=5",
                                                "--config.model.width=8"], ["--workdir", "w",
                                                                             "--json"])
  assert split_config_args(["--config=b.py"])[0] == "b.py"


def test_cli_holds_no_config_logic_and_nothing_imports_it():
  from loopjax import cli
  assert not any(hasattr(cli, n) for n in ("load_config", "split_config_args",
                                           "_split_config_args"))
  for dirpath, _, files in os.walk(os.path.join(ROOT, "loopjax")):
    for name in files:
      if name.endswith(".py") and os.path.basename(dirpath) != "cli":
        path = os.path.join(dirpath, name)
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
          if isinstance(node, ast.ImportFrom):
            assert node.module != "loopjax.cli", f"{path} imports loopjax.cli"
            assert not (node.module == "loopjax" and any(a.name == "cli" for a in node.names))


# ------------------------------------------------------------------ one grammar for S


def test_training_loops_accept_bare_and_fixed_forms():
  want = LoopDistribution.parse("fixed:8")
  assert want.probs == (0.0,) * 7 + (1.0,)
  assert LoopDistribution.parse("8") == LoopDistribution.parse(8) == want
  assert LoopDistribution.parse(" 8 ") == want
  assert LoopDistribution.parse("uniform:1:4").expected == pytest.approx(2.5)
  c = load_config(SUDOKU + ":mdm", ["--config.loops.train=4", "--config.model.loop_start=1",
                                    "--config.model.loop_end=2"])
  assert model_config(c).max_loops == 4
  for bad in ("0", "fixed:0", "fixed:", "fixed:1:2", "uniform:3:1", "adaptive:0.1", "x", "-2"):
    with pytest.raises(ValueError, match=r"loops.train: cannot parse .*'S' or 'fixed:S'"):
      LoopDistribution.parse(bad)


def test_inference_loops_accept_bare_and_fixed_forms():
  for spec in ("8", "fixed:8", " fixed:8", 8):
    pol = LoopPolicy.parse(spec)
    assert (pol.kind, pol.loops, pol.largest) == ("fixed", 8, 8)
  cfg = ModelConfig(kernels="reference",
                    vocab_size=16, max_length=8, width=16, num_layers=3, num_heads=2,
                    cond_dim=8, loop_start=1, loop_end=2, max_loops=4)
  assert [int(a) for a in loop_args(resolve_policy(cfg, "fixed:3"))[:2]] == [3, 3]
  assert resolve_policy(cfg, "fixed:3").label == resolve_policy(cfg, 3).label == 3
  specs = split_specs(["1,fixed:2,adaptive:0.1", "time:8,4"])
  assert specs == ["1", "fixed:2", "adaptive:0.1", "time:8,4"]
  assert [resolve_policy(cfg, s).largest for s in specs] == [1, 2, 4, 8]
  for bad, msg in (("fixed:0", "S must be >= 1"), ("fixed:1:2", "fixed takes one S"),
                   ("fixed:x", "not a number"), ("uniform:1:3", "unknown kind 'uniform'")):
    with pytest.raises(ValueError, match=msg):
      LoopPolicy.parse(bad)
  with pytest.raises(ValueError, match=r"forms: N \| fixed:N"):
    LoopPolicy.parse("fixed:x")
