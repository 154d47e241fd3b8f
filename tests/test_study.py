"""The small-scale study pipeline end to end at a tiny size, and the attention analysis CLI."""

import json
import os

from loopjax.cli import main
from loopjax.evaluate.study import run_study


def test_study_pipeline_tiny(tmp_path, in_process_compile_cache):
  # (The cache: every checkpoint of a run is scored through a freshly loaded model, which
  # compiles the same sampler again.)
  result = run_study(str(tmp_path), task="sudoku", scale="tiny", log=lambda *_: None)
  assert set(result["runs"]) == {"mdm", "loopmdm", "deep_mdm", "mdm_matched"}
  runs = result["runs"]
  # FLOP matching: LoopMDM's total training FLOPs equal the baseline's within one step's worth;
  # the deeper MDM matches LoopMDM per step; same-steps MDM spends less.
  assert abs(runs["loopmdm"]["total_train_flops"] - runs["mdm"]["total_train_flops"]) <= \
      runs["loopmdm"]["flops_per_step"]
  assert runs["loopmdm"]["steps"] < runs["mdm"]["steps"]
  assert runs["deep_mdm"]["layers"] > runs["mdm"]["layers"]
  assert runs["mdm_matched"]["steps"] == runs["loopmdm"]["steps"]
  assert runs["loopmdm"]["params"] == runs["mdm"]["params"]
  for run in runs.values():
    assert [p["step"] for p in run["curve"]] == sorted(p["step"] for p in run["curve"])
    # The curve ends on the trained model, and its x axis is the FLOPs spent to reach each step.
    assert run["curve"][-1]["step"] == run["steps"] and run["final"] == run["curve"][-1]
    assert all(p["train_flops"] == p["step"] * run["flops_per_step"] for p in run["curve"])
  loops = [row["loops"] for row in result["loop_sweep"]]
  assert "12" in loops and any(s.startswith("adaptive") for s in loops)
  for name in ("study.json", "study.md", "plots/study_quality_vs_train_flops.png",
               "plots/study_quality_vs_loops.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  saved = json.load(open(tmp_path / "study.json"))
  assert saved["runs"]["mdm"]["final"] == runs["mdm"]["final"]
  assert "| loopmdm |" in open(tmp_path / "study.md").read()

  # The attention analysis on one of the study's runs.
  run = tmp_path / "runs" / "loopmdm"
  assert main(["analyze", "attention", "--workdir", str(run), "--loops", "1,3",
               "--examples", "4", "--time-points", "2"]) == 0
  att = json.load(open(run / "eval" / "attention.json"))
  assert [r["loops"] for r in att["per_loops"]] == [1, 3]
  assert len(att["per_loops"][1]["share"]) == len(att["per_loops"][0]["share"]) + 2
  assert os.path.getsize(run / "plots" / "attention_heatmap.png") > 0
