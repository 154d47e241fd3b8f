"""Per-device memory of a config's train step on a mesh, read off the compiled program.

    loopjax memory --config A [--mesh data=1,fsdp=8,tensor=1] [--devices 8] [--topology v5e:2x4]

The train step (the same jitted, donated, sharded step the trainer runs) is lowered with
jax.ShapeDtypeStruct inputs and compiled ahead of time: nothing is allocated and no accelerator is
needed. Devices are fake CPU devices (`--devices N`), or, with `--topology` and the `libtpu` wheel
installed, compile-only TPU devices of that topology, so the TPU compiler itself does the buffer
assignment. Parameters, EMA and optimizer state per device are exact (their shard shapes);
activations/temp, arguments and outputs come from `compiled.memory_analysis()`.

On fake CPU devices the temp figure is the CPU compiler's (it fuses and lays out differently and
may keep bfloat16 math in float32): a guide, not a guarantee. Use `--topology` for TPU numbers.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import tempfile

import jax
import numpy as np

from loopjax import flops as flops_lib
from loopjax.parallel import hlo, roofline
from loopjax.parallel import mesh as mesh_lib
from loopjax.parallel import topology as topology_lib
from loopjax.parallel.topology import tpu_topology_devices
from loopjax.config.run import from_config
from loopjax.train.step import build_train_step

GIB = 1024 ** 3

# Memory per device in GiB by device_kind (prefix match); --device-memory-gib overrides.
DEVICE_MEMORY_GIB = (
    ("TPU v4", 32), ("TPU v5 lite", 16), ("TPU v5e", 16), ("TPU v5p", 95), ("TPU v5", 95),
    ("TPU v6 lite", 32), ("TPU v6e", 32), ("TPU7x", 192),
    ("NVIDIA H200", 141), ("NVIDIA H100", 80), ("NVIDIA A100-SXM4-40GB", 40),
    ("NVIDIA A100", 80), ("NVIDIA B200", 180),
)


def device_memory_gib(device_kind: str) -> float | None:
  for prefix, gib in DEVICE_MEMORY_GIB:
    if device_kind.startswith(prefix):
      return float(gib)
  return None


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (worst device)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def _global_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def compile_train_step(config, mesh, dump_dir: str | None = None):
  """(compiled train step, its TrainProgram): the trainer's step, compiled AOT for `mesh`;
  `dump_dir`: XLA writes the optimised HLO there as text."""
  program = build_train_step(config, mesh)
  lowered = program.step.lower(program.abstract_state, program.abstract_batch())
  options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True} if dump_dir else None
  return lowered.compile(compiler_options=options), program


def _optimized_hlo(compiled, dump_dir: str | None) -> str:
  """The partitioned, optimised HLO text. Large TPU executables cannot always be turned back
  into text (`as_text` fails on some async collectives), so for accelerators it is read from
  the compiler's own dump."""
  if dump_dir is None:
    return compiled.as_text()
  paths = sorted(glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt")))
  if not paths:
    raise RuntimeError(f"XLA wrote no optimised HLO of the train step to {dump_dir}")
  with open(paths[-1], encoding="utf-8") as f:
    return f.read()


def memory_report(run, devices=None, mesh_cfg=None, memory_gib: float | None = None) -> dict:
  """Bytes per device of the train step of `run` (a resolved Run, or a config resolved here) on
  a mesh over `devices` (default: all)."""
  run = from_config(run)
  config = run.config
  devices = list(jax.devices() if devices is None else devices)
  mesh = mesh_lib.make_mesh(dict(run.mesh) if mesh_cfg is None else mesh_cfg, devices)
  dump_dir = None if devices[0].platform == "cpu" else tempfile.mkdtemp(prefix="loopjax_hlo_")
  try:
    compiled, program = compile_train_step(run, mesh, dump_dir)
    hlo_text = _optimized_hlo(compiled, dump_dir)
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses programs that cannot fit; that is an answer, not a failure.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    msg = str(e).strip().splitlines()[0]
    need = re.search(r"required for [\w ]+ \(([\d.]+\w?)\) exceeds available \w+ \(([\d.]+\w?)\)",
                     msg)
    return {"device_kind": devices[0].device_kind, "num_devices": len(devices),
            "mesh": {k: int(v) for k, v in mesh.shape.items()}, "fits": False,
            "peak_bytes": None, "activation_collectives": None,
            "compiler_error": msg[:500],
            "compiler_needs": f"{need[1]} of {need[2]}" if need else None}
  finally:
    if dump_dir:
      shutil.rmtree(dump_dir, ignore_errors=True)
  abstract, batch = program.abstract_state, program.abstract_batch()
  m = compiled.memory_analysis()
  state_other = (_shard_bytes(abstract) - _shard_bytes(abstract.params)
                 - _shard_bytes(abstract.ema_params) - _shard_bytes(abstract.opt_state))
  out = {
      "device_kind": devices[0].device_kind, "num_devices": len(devices),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "batch_size": int(config.train.batch_size), "seq_len": int(config.data.seq_len),
      "param_count": sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract.params)),
      "params_global": _global_bytes(abstract.params),
      "params": _shard_bytes(abstract.params),
      "ema_params": _shard_bytes(abstract.ema_params),
      "opt_state": _shard_bytes(abstract.opt_state),
      "state_other": state_other,
      "batch": _shard_bytes(batch),
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
      "aliased": int(m.alias_size_in_bytes),
      "temp": int(m.temp_size_in_bytes),
      "code": int(m.generated_code_size_in_bytes),
  }
  # Donated state: outputs alias arguments, so they are counted once.
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"] + out["code"]
  # The compiler's own peak (live ranges of every buffer) where it is meaningful (TPU/GPU; the
  # CPU backend reports near zero); else the sum above, which assumes everything lives at once.
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  if peak and devices[0].platform != "cpu":
    out["peak"] = peak
  out["needed"] = out["peak_bytes"] = out.get("peak", out["total"])
  gib = memory_gib if memory_gib else device_memory_gib(out["device_kind"])
  if gib:
    out["device_memory"] = int(gib * GIB)
    out["fits"] = out["needed"] <= out["device_memory"]
  out["kernels"] = program.model.cfg.kernels
  out.update(_collective_report(hlo_text, run, program.model.cfg, out["mesh"]))
  out.update(_roofline_report(compiled, run, program.model.cfg, out))
  return out


def _collective_report(hlo_text: str, run, cfg, mesh_shape: dict) -> dict:
  """The partitioned program's collectives (loopjax.parallel.hlo), each flagged, and totals."""
  config, dist = run.config, run.loops
  fraction = dist.expected / cfg.max_loops if cfg.looped else 1.0
  colls = hlo.classify(hlo.collectives(hlo_text, loop_fraction=fraction),
                       batch=int(config.train.batch_size), length=int(config.data.seq_len),
                       batch_shards=mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1),
                       tensor=mesh_shape.get("tensor", 1))
  keys = ("op", "bytes", "runs", "async", "in_loop", "activation", "expected", "group",
          "wire_bytes", "shapes", "scope")
  listed = [{k: c[k] for k in keys} for c in colls]
  return {"collectives": {**hlo.totals(colls), "list": listed},
          "activation_collectives": [c for c in listed if c["activation"] and not c["expected"]]}


def _roofline_report(compiled, run, cfg, r: dict) -> dict:
  """FLOPs per device (the compiler's count, which covers each while body once, and the model's,
  loopjax.flops) and the roofline bound for the chip compiled for (loopjax.parallel.roofline)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  config, dist = run.config, run.loops
  n, batch, length = r["num_devices"], int(config.train.batch_size), int(config.data.seq_len)
  loops = dist.expected if cfg.looped else 1.0
  model = flops_lib.expected_train_flops_per_step(cfg, length, batch, dist) / n
  executed = model + flops_lib.remat_overhead_flops_per_seq(cfg, length, loops) * batch / n
  loop_share = (cfg.block_layers * loops * flops_lib.layer_flops_per_seq(cfg, length)
                / flops_lib.forward_flops_per_seq(cfg, length, loops)) if cfg.looped else 0.0
  out = {"flops": {"xla": float(cost.get("flops", 0.0)),
                   "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                   "model": model, "executed": executed, "loop_share": loop_share,
                   "expected_loops": loops}}
  out["flops"]["xla_over_executed"] = out["flops"]["xla"] / executed if executed else None
  gen = roofline.generation(r["device_kind"])
  c = r["collectives"]
  out["roofline"] = None if gen is None else roofline.estimate(
      gen, flops=executed, hbm_bytes=out["flops"]["xla_bytes_accessed"], model_flops=model,
      loop_share=loop_share, sync_wire=c["sync"]["wire_bytes"],
      async_loop_wire=sum(x["wire_bytes"] * x["runs"] for x in c["list"]
                          if x["async"] and x["in_loop"]),
      async_other_wire=sum(x["wire_bytes"] * x["runs"] for x in c["list"]
                           if x["async"] and not x["in_loop"]))
  return out


def format_report(r: dict) -> str:
  if "compiler_error" in r:
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    need = f"needs {r['compiler_needs']} per device" if r.get("compiler_needs") else \
        f"says {r['compiler_error']}"
    return (f"DOES NOT FIT on {r['num_devices']} x {r['device_kind']} (mesh {mesh}): "
            f"the compiler {need}")
  def g(b):
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
      if b >= size:
        return f"{b / size:8.2f} {unit}"
    return f"{b:8d} B  "

  mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"train step of {r['param_count'] / 1e6:.1f}M parameters, batch {r['batch_size']} x "
           f"{r['seq_len']}, on {r['num_devices']} x {r['device_kind']} (mesh {mesh})",
           "per device:",
           f"  parameters        {g(r['params'])}   (all devices: {g(r['params_global']).strip()})",
           f"  EMA parameters    {g(r['ema_params'])}",
           f"  optimizer state   {g(r['opt_state'])}",
           f"  batch             {g(r['batch'])}",
           f"  activations/temp  {g(r['temp'])}",
           f"  code              {g(r['code'])}",
           f"  total             {g(r['total'])}   (arguments + outputs - donated + temp + code)"]
  if "peak" in r:
    lines.append(f"  XLA peak          {g(r['peak'])}   (buffer live ranges: what must fit)")
  if "device_memory" in r:
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines.append(f"  device memory     {g(r['device_memory'])}   -> {verdict}")
  lines += _format_collectives(r, g)
  if r["device_kind"] == "cpu":
    lines.append("(fake CPU devices: temp is the CPU compiler's estimate; use --topology for TPU)")
  return "\n".join(lines)


def _format_collectives(r: dict, g) -> list[str]:
  c = r["collectives"]
  ops = ", ".join(f"{n} {op}" for op, n in c["by_op"].items()) or "none"
  lines = [f"collectives: {c['count']} ({ops}); per step {c['runs']:.0f} runs, "
           f"{g(c['bytes']).strip()}; in the loop {c['in_loop']['count']} "
           f"({g(c['in_loop']['bytes']).strip()} per step); synchronous {c['sync']['count']} "
           f"({g(c['sync']['bytes']).strip()} per step); kernels {r['kernels']}"]
  act = r["activation_collectives"]
  expected = [x for x in c["list"] if x["expected"]]
  if expected:
    lines.append(f"  {len(expected)} move per-shard activations as the mesh calls for "
                 f"({expected[0]['expected']})")
  if act:
    lines.append(f"  {len(act)} ACTIVATION-SIZED, not called for by the mesh (global: spans "
                 f"{r['batch_size']} x {r['seq_len']}; per_shard: this device's rows):")
    lines += [f"    {a['activation']} {a['op']} {a['shapes'][:2]} ({g(a['bytes']).strip()})"
              f"{' in loop' if a['in_loop'] else ''}" for a in act[:8]]
  else:
    lines.append("  none moves an activation the mesh does not call for")
  f, rl = r["flops"], r.get("roofline")
  lines.append(f"FLOPs per device per step: model {f['model']:.3g} (E[S] = "
               f"{f['expected_loops']:.2f}), executed with remat {f['executed']:.3g}; "
               f"the compiler counts {f['xla']:.3g} (each while body once)")
  if rl:
    lines.append(f"roofline ({rl['chip']}): step >= {rl['step_s_lower_bound'] * 1e3:.1f} ms "
                 f"(compute {rl['compute_s'] * 1e3:.1f}, HBM {rl['hbm_s'] * 1e3:.1f}, comm sync "
                 f"{rl['comm_sync_s'] * 1e3:.1f} / async loop {rl['comm_async_loop_s'] * 1e3:.1f}"
                 f" / async other {rl['comm_async_other_s'] * 1e3:.1f} ms); MFU <= "
                 f"{rl['mfu_upper_bound']:.3f}; exposed communication "
                 f"{rl['exposed_comm_share']:.1%} of the step")
  return lines


def parse_mesh(text: str) -> dict[str, int]:
  out = {}
  for part in filter(None, text.split(",")):
    key, sep, val = part.partition("=")
    if not sep or not val.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh wants data=..,fsdp=..,tensor=.. with integer sizes, -1 fills "
                       f"(got {part!r})")
    out[key.strip()] = int(val)
  return out


def compile_devices(topology: str | None = None, num_slices: int = 1,
                    count: int | None = None, mesh_cfg: dict | None = None):
  """(devices, libtpu flags source or None) to compile for: compile-only TPU devices of
  `topology` (with the launchers' libtpu flags for it, set before libtpu loads), else `count`
  fake CPU devices (default: the mesh's size, else 8)."""
  if topology:
    jax.config.update("jax_platforms", "cpu")
    _, flags_source = topology_lib.set_libtpu_flags(topology)
    return tpu_topology_devices(topology, num_slices), flags_source
  n = count
  if n is None:
    sizes = list((mesh_cfg or {}).values())
    n = math.prod(sizes) if sizes and all(s > 0 for s in sizes) else 8
  jax.config.update("jax_platforms", "cpu")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # jax refuses the device count once its backends exist
    if len(jax.devices("cpu")) != n:
      raise ValueError(f"jax is already initialised with {len(jax.devices('cpu'))} CPU "
                       f"devices; run `loopjax memory` in a fresh process for {n}") from None
  return jax.devices("cpu")[:n], None
