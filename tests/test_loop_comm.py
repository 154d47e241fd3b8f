"""The looped block's weights are gathered once per step, not in every loop iteration.

A tiny LoopMDM train step is compiled for 8 fake CPU devices with FSDP (fsdp=8) and with
FSDP plus tensor parallelism (data=2, fsdp=2, tensor=2). In the optimised HLO, a collective that
`loopjax.parallel.hlo.collectives` marks `in_loop` (reached from the looped block's `while`
body) runs once per iteration. With `model.loop_weights=gathered` (the default) no
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
    from loopjax.parallel import mesh as mesh_lib
    from loopjax.parallel.hlo import collectives
    from loopjax.config.load import load_config
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
      inloop = [c for c in collectives(compiled.as_text()) if c["in_loop"]]
      shapes = [c["shapes"] for c in inloop]
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
  script = _SCRIPT % {"length": LENGTH, "exp": os.path.join(ROOT, "experiments", "sudoku.py")}
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


_SP_SCRIPT = textwrap.dedent("""
    import json
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_num_cpu_devices", 8)
    from loopjax.model import LoopedTransformer, ModelConfig
    from loopjax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tokens = jax.device_put(np.random.default_rng(0).integers(0, 11, size=(8, 16)).astype(
        np.int32), mesh_lib.batch_sharding(mesh))
    out = {}
    for sp in (False, True):
      model = LoopedTransformer(ModelConfig(kernels="reference",
                                            vocab_size=11, max_length=16, width=32, num_layers=3,
                                            num_heads=2, cond_dim=8, loop_start=1, loop_end=2,
                                            max_loops=2, sequence_parallel=sp))
      params = jax.device_put(nn.unbox(model.init(jax.random.PRNGKey(0), tokens, 2)["params"]),
                              mesh_lib.replicated(mesh))
      def loss(p):
        return model.apply({"params": p}, tokens, 2, targets_BxL=tokens).mean()
      fn = jax.jit(mesh_lib.with_rules(jax.value_and_grad(loss), mesh))
      text = fn.lower(params).compile().as_text()
      value, grads = fn(params)
      out[str(sp)] = {"loss": float(value),
                      **{op: text.count(op + "(") for op in ("reduce-scatter", "all-gather",
                                                              "all-reduce", "dynamic-slice")},
                      "grad_sum": float(sum(jnp.abs(g).sum() for g in
                                            jax.tree_util.tree_leaves(grads)))}
    print("RESULT " + json.dumps(out))
""")


def test_sequence_parallel_stream_same_loss_and_gradients():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  run = subprocess.run([sys.executable, "-c", _SP_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=900, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  r = json.loads([l for l in run.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  off, on = r["False"], r["True"]
  assert abs(on["loss"] - off["loss"]) <= 1e-5 * abs(off["loss"]), r
  assert abs(on["grad_sum"] - off["grad_sum"]) <= 1e-5 * off["grad_sum"], r
  # The length-split stream is gathered back before each block's projections.
  assert on["all-gather"] > off["all-gather"], r
