"""Evaluations are registered entries (name -> function, options, check) that `run_eval` and
`loopjax eval` dispatch through."""

import json
import os

import pytest

from loopjax.cli.eval import build_parser, evaluations
from loopjax.evaluate import evaluations as E
from loopjax.evaluate.loop_cost import default_sweep
from loopjax.evaluate.sweep import run_eval


def test_options_are_checked_by_name_before_any_model_loads(tmp_path):
  with pytest.raises(ValueError, match="unknown evaluation 'perplexity'; registered: likelihood"):
    E.checked_options({"perplexity": {}})
  with pytest.raises(ValueError, match=r"'tasks': unknown option\(s\) \['example'\]"):
    E.checked_options({"tasks": {"example": 3}})
  with pytest.raises(FileNotFoundError):  # gsm8k's own check reads its file
    E.checked_options({"gsm8k": {"file": str(tmp_path / "absent.jsonl")}})
  got = E.checked_options({"tasks": {}, "likelihood": {"batches": 5}})
  assert list(got) == ["likelihood", "tasks"]  # registration order, whatever was asked first
  assert got["likelihood"][1] == {"batches": 5, "time_points": 8}
  assert got["tasks"] == (E.EVALUATIONS["tasks"], {"examples": 128})


def test_the_eval_flags_ask_for_registered_evaluations_only():
  p = build_parser()
  a = p.parse_args(["--workdir", "w"])
  assert evaluations(a) == {"likelihood": {"batches": 2, "time_points": 8},
                            "tasks": {"examples": 128}}
  a = p.parse_args(["--workdir", "w", "--no-nelbo", "--no-tasks", "--corpus", "c.txt",
                    "--gen-ppl", "judge", "--samples", "3", "--time-points", "2"])
  got = evaluations(a)
  assert set(got) == {"zero_shot", "gen_ppl"} and set(got) <= set(E.EVALUATIONS)
  assert got["gen_ppl"]["samples"] == 3 and got["zero_shot"]["time_points"] == 2
  for name, options in got.items():  # every option the flags set is one the entry takes
    assert set(options) <= set(E.EVALUATIONS[name].defaults), name


def test_adding_an_evaluation_is_one_registered_function(tiny_sudoku_run, tmp_path, monkeypatch):
  """A new entry runs through run_eval with the shared sweep (model, loop specs, steps) and its
  own options, after the built-in ones asked for, and its rows land in summary.json."""
  monkeypatch.setattr(E, "EVALUATIONS", dict(E.EVALUATIONS))
  seen = []

  @E.register("probe", scale=1)
  def probe(sweep, options):
    seen.append(([p.label for p in sweep.specs], sweep.steps, options))
    rows = [{"loops": p.label, "value": options["scale"] * p.largest} for p in sweep.specs]
    sweep.write("probe.json", {**sweep.header, "rows": rows})
    return rows

  with pytest.raises(ValueError, match="registered twice"):
    E.register("probe")(probe)
  workdir = tiny_sudoku_run[0]
  out = str(tmp_path / "out")
  summary = run_eval(workdir, {"probe": {"scale": 3}}, steps=(2,), out=out)
  s_max = summary["s_max"]
  want = list(default_sweep(s_max))  # fixed S: the label is S itself
  assert seen == [(want, [2], {"scale": 3})]
  assert summary["probe"] == [{"loops": s, "value": 3 * s} for s in want]
  assert "likelihood" not in summary and "tasks" not in summary  # only what was asked for
  on_disk = json.load(open(os.path.join(out, "eval", "summary.json")))
  assert on_disk["probe"] == summary["probe"]
  assert os.path.isfile(os.path.join(out, "eval", "probe.md"))  # tables from the rows
