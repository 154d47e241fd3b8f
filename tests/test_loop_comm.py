"""The looped block's weights are gathered once per step, not in every loop iteration.

A tiny LoopMDM train step is compiled for 8 fake CPU devices with FSDP (fsdp=8) and with
FSDP plus tensor parallelism (data=2, fsdp=2, tensor=2). In the optimised HLO, the loop is the
`while` whose body runs the block under the `conditional` of `i < S`; a collective reachable
from that body runs once per iteration. With `model.loop_weights=gathered` (the default) no
collective there moves a weight or a weight's gradient (the tensor-parallel layout keeps its
activation collectives, whose operands span the sequence); `per_iteration` has them (so the
check can fail). One step of both layouts gives the same loss and parameters.
"""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 81  # Sudoku rows: an activation's operand has a dimension that is a multiple of it

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, %(bench)r)
    from loop_comm import loop_collectives
    from loopjax.parallel import mesh as mesh_lib
    from loopjax.parallel.hlo import collectives
    from loopjax.train.config_load import load_config
    from loopjax.train.step import build_train_step

    OVERRIDES = ["--config.model.width=64", "--config.model.num_layers=3",
                 "--config.model.num_heads=4", "--config.model.cond_dim=16",
                 "--config.model.loop_start=1", "--config.model.loop_end=2",
                 "--config.model.dropout=0.0", "--config.train.batch_size=16",
                 "--config.loops.train=uniform:1:3", "--config.train.lr_schedule=constant",
                 "--config.train.warmup_steps=0"]
    tokens = np.random.default_rng(0).integers(0, 9, size=(16, %(length)d)).astype(np.int32)
    out = {}
    for mesh_s, weights in (("fsdp=8", "gathered"), ("data=2,fsdp=2,tensor=2", "gathered"),
                            ("fsdp=8", "per_iteration")):
      config = load_config(%(exp)r, OVERRIDES + [f"--config.model.loop_weights={weights}"])
      mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1,
                                 **{k: int(v) for k, v in (p.split("=") for p in
                                                           mesh_s.split(","))}})
      program = build_train_step(config, mesh)
      state = program.init_state()
      compiled = program.step.lower(state, program.abstract_batch()).compile()
      inloop = loop_collectives(compiled.as_text())
      shapes = [c["shapes"] for l in inloop for c in collectives(l["line"])]
      weight = [s for s in shapes if not any(d %% %(length)d == 0 for dims in s for d in dims)]
      batch = {"tokens": tokens, "fixed": np.zeros_like(tokens, bool),
               "loss_mask": np.ones_like(tokens, bool), "segment_ids": np.ones_like(tokens)}
      batch = jax.device_put(batch, program.batch_sharding)
      state, metrics = compiled(state, batch)
      leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
      out[mesh_s + ":" + weights] = {
          "in_loop": len(inloop), "in_loop_weight": len(weight), "loss": float(metrics["loss"]),
          "param_sum": float(sum(np.abs(x).sum() for x in leaves))}
    print("RESULT " + json.dumps(out))
""")


def test_no_weight_collective_inside_the_loop_and_same_step():
  script = _SCRIPT % {"bench": os.path.join(ROOT, "benchmarks"), "length": LENGTH,
                      "exp": os.path.join(ROOT, "experiments", "sudoku.py")}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=1500, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  line = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")][-1]
  r = json.loads(line[len("RESULT "):])
  fsdp, tp, per_iter = r["fsdp=8:gathered"], r["data=2,fsdp=2,tensor=2:gathered"], \
      r["fsdp=8:per_iteration"]
  # FSDP: nothing at all is communicated inside the loop; tensor parallel: activations only.
  assert fsdp["in_loop"] == 0, r
  assert tp["in_loop_weight"] == 0, r
  # The old layout gathers the weights in the loop: the check sees them.
  assert per_iter["in_loop_weight"] > 0, r
  # The same step, whatever the layout (float32, summed in another order).
  for other in (tp, per_iter):
    assert abs(other["loss"] - fsdp["loss"]) <= 1e-5 * abs(fsdp["loss"]), r
    assert abs(other["param_sum"] - fsdp["param_sum"]) <= 1e-5 * fsdp["param_sum"], r
