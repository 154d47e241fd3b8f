"""The small-scale study pipeline end to end at a tiny size, and the attention analysis CLI."""

import json
import os

from loopjax.cli import main
from loopjax.evaluate.study import run_study


def test_study_pipeline_tiny(tmp_path, in_process_compile_cache):
  # (The cache: every checkpoint of a run is scored through a freshly loaded model, which
  # compiles the same sampler again.)
  lines = []
  result = run_study(str(tmp_path), preset="tiny", log=lines.append)
  assert set(result["models"]) == {"mdm", "loopmdm", "deep_mdm"}
  runs = result["models"]
  # FLOP matching: LoopMDM's total training FLOPs equal the baseline's within one step's worth;
  # the deeper MDM matches LoopMDM per step.
  assert abs(runs["loopmdm"]["total_train_flops"] - runs["mdm"]["total_train_flops"]) <= \
      runs["loopmdm"]["flops_per_step"]
  assert runs["loopmdm"]["steps"] < runs["mdm"]["steps"]
  assert runs["deep_mdm"]["layers"] > runs["mdm"]["layers"]
  assert runs["loopmdm"]["params"] == runs["mdm"]["params"]
  for name, run in runs.items():
    # Every learning rate was tried on seed 0 and the lowest held-out loss won.
    sweep = {x["lr"]: x["bits_per_token"] for x in run["lr_sweep"]}
    assert sorted(sweep) == sorted(result["lrs"]) and sweep[run["best_lr"]] == min(sweep.values())
    for lr in result["lrs"]:
      assert (tmp_path / "runs" / name / f"lr{lr:g}_seed0" / "checkpoints").is_dir()
    assert [s["seed"] for s in run["seeds"]] == result["seeds"]
    for s in run["seeds"]:
      curve = s["curve"]
      assert [p["step"] for p in curve] == sorted(p["step"] for p in curve) and len(curve) >= 2
      # The curve ends on the trained model, and its x axis is the FLOPs spent to reach each step.
      assert curve[-1]["step"] == run["steps"] and s["final"] == curve[-1]
      assert all(p["train_flops"] == p["step"] * run["flops_per_step"] for p in curve)
  # Different seeds are different runs.
  finals = [s["final"]["bits_per_token"] for s in runs["mdm"]["seeds"]]
  assert finals[0] != finals[1]
  summary = result["summary"]
  acc = summary["models"]["mdm"]["accuracy"]
  assert acc["n"] == 2 and acc["min"] <= acc["mean"] <= acc["max"]
  loops = [row["loops"] for row in result["loop_sweep"]]
  assert "4" in loops and any(s.startswith("adaptive") for s in loops)
  assert {c["verdict"] for c in summary["claims"]} <= {"reproduced", "not reproduced",
                                                       "inconclusive"}
  assert len(summary["claims"]) == 5
  for name in ("study.json", "study.md", "plots/study_quality_vs_train_flops.png",
               "plots/study_bits_vs_train_flops.png", "plots/study_quality_vs_loops.png",
               "plots/study_lr_sweep.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  saved = json.load(open(tmp_path / "study.json"))
  assert saved["models"]["mdm"]["seeds"][0]["final"] == runs["mdm"]["seeds"][0]["final"]
  report = open(tmp_path / "study.md").read()
  assert "| loopmdm |" in report and "| paper's claim | verdict | evidence |" in report
  # A second call finds every run trained and only re-scores.
  logs = sorted(tmp_path.glob("runs/*/*/metrics.jsonl"))
  assert len(logs) == 3 * (len(result["lrs"]) + len(result["seeds"]) - 1)
  stamps = [p.stat().st_mtime_ns for p in logs]
  again = run_study(str(tmp_path), preset="tiny", log=lines.append)
  assert again["models"]["mdm"]["seeds"][1]["final"] == runs["mdm"]["seeds"][1]["final"]
  assert [p.stat().st_mtime_ns for p in logs] == stamps

  # The attention analysis on one of the study's runs.
  run = tmp_path / "runs" / "loopmdm" / f"lr{runs['loopmdm']['best_lr']:g}_seed0"
  assert main(["analyze", "attention", "--workdir", str(run), "--loops", "1,3",
               "--examples", "4", "--time-points", "2"]) == 0
  att = json.load(open(run / "eval" / "attention.json"))
  assert [r["loops"] for r in att["per_loops"]] == [1, 3]
  assert len(att["per_loops"][1]["share"]) == len(att["per_loops"][0]["share"]) + 2 * 2  # 2 more passes of the 2-layer block
  assert os.path.getsize(run / "plots" / "attention_heatmap.png") > 0
