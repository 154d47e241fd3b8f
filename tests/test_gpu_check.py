"""benchmarks/gpu_check.py on CPU (--smoke): its phases, its bf16-justified attention check and
its deadline. The cuDNN comparison itself needs a GPU; here the xla_cpu kernels stand in as the
candidate, through the same code."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args, timeout=900):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "gpu_check.json"
  t = time.perf_counter()
  run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                        "--smoke", "--attention", "xla_cpu", "--json", str(out), *args],
                       env=env, capture_output=True, text=True, timeout=timeout)
  return run, json.loads(out.read_text()), time.perf_counter() - t


def test_smoke_runs_the_paper_step_and_checks_attention_through_the_loop(tmp_path):
  run, r, _ = _run(tmp_path, "--phases", "attention,loopmdm", "--steps", "6")
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert r["status"] == "done" and set(r["phases"]) == {"attention", "loopmdm"}
  a = r["phases"]["attention"]
  assert a["ok"] and a["used_for_the_rest"] == "xla_cpu" and a["loops"] == 3
  for case in ("one_document_no_mask", "two_documents_mask"):
    for what in ("logits", "grads"):
      bf16 = a[case][f"{what}_bf16_reference_vs_f32"]
      # bf16 is really in effect (a float32 run would be ~1e-7 from the truth), and the
      # candidate is within the tolerance derived from it.
      assert 1e-4 < bf16 < 0.05, (case, what, bf16)
      assert a[case][f"{what}_candidate_vs_f32"] <= a[case][f"{what}_tolerance"]
  s = r["phases"]["loopmdm"]
  assert (s["padded_vocab"], s["remat"], s["dtype"], s["loops_train"]) == (
      128, "dots_no_batch", "bfloat16", "uniform:1:12")  # the paper config as trained
  assert s["steps"] == 6 and all(1 <= x <= 12 for x in s["loops_drawn"])
  assert len(set(s["loops_drawn"])) > 1  # S drawn inside the step, as in training
  assert all(0 < x < 20 for x in s["losses"]) and s["mfu"] > 0


def test_the_watchdog_stops_it_before_the_deadline_with_its_json_written(tmp_path):
  # One phase far longer than the deadline allows, whatever the compilation cache holds: the
  # watchdog, not the end of the work, must end the process.
  run, r, seconds = _run(tmp_path, "--phases", "loopmdm", "--steps", "2000", "--deadline-s", "20",
                         "--margin-s", "2", timeout=120)
  assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
  assert r["status"].startswith("stopped by the watchdog") and seconds < 30
  assert "machine" in r  # written before the first phase
