"""Collectives inside the looped block's S_max loop, per-chip peak and collective bytes of the
paper step compiled for a TPU topology (compile-only, needs the libtpu wheel).

    python benchmarks/loop_comm.py --mesh fsdp=32 [--topology v5p:2x4x4] [--config ...]
        [--out results/loop_comm_fsdp32.json] [--hlo-out step.hlo] [--config.model.X=Y ...]

The loop is the `while` whose body runs the block under a `conditional` (the nn.cond of
`i < S`); a collective reachable from that body (through calls, fusions, async wrappers, the
cond's branches, nested scans) runs once per iteration. See `loop_collectives`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_REFS = re.compile(r"(?:body|condition|to_apply|calls|true_computation|false_computation|"
                   r"branch_computations|called_computations|async_execution_thread)="
                   r"\{?(?P<names>%[\w.\-]+(?:,\s*%[\w.\-]+)*)\}?")
_OP = re.compile(r"\s(?P<op>[a-z][a-z0-9\-]*)\(")
_CUSTOM = re.compile(r'custom_call_target="(?P<t>[^"]+)"')


def computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of an HLO module's text."""
  comps, name = {}, None
  for line in hlo_text.splitlines():
    if name is None:
      m = _HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        name, comps[m["name"]] = m["name"], []
    elif line.strip() == "}":
      name = None
    else:
      comps[name].append(line)
  return comps


def _op(line: str) -> str | None:
  """The opcode of an instruction line (the first `word(` after its `=`)."""
  head, eq, rest = line.partition("=")
  m = _OP.search(rest) if eq else None
  return m["op"] if m else None


def _refs(line: str) -> list[str]:
  return [n.strip().lstrip("%") for m in _REFS.finditer(line) for n in m["names"].split(",")]


def _collective(line: str) -> str | None:
  op = _op(line) or ""
  base = op[:-len("-start")] if op.endswith("-start") else op
  if base in _OPS:
    return base
  if op == "custom-call":  # TPU's fused reduce-scatter / all-gather custom calls
    t = _CUSTOM.search(line)
    for name in _OPS:
      if t and name.replace("-", "") in t["t"].lower().replace("-", "").replace("_", ""):
        return name
  return None


def _reach(comps, start: str, stop_at_while: bool) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for line in comps[c]:
      if stop_at_while and _op(line) == "while":
        continue
      todo.extend(_refs(line))
  return seen


def loop_bodies(comps) -> list[str]:
  """Bodies of the `while` ops that run a `conditional` directly (not inside a nested while)."""
  bodies = []
  for lines in comps.values():
    for line in lines:
      if _op(line) != "while":
        continue
      body = re.search(r"body=%?([\w.\-]+)", line)[1]
      if any(_op(l) == "conditional" for c in _reach(comps, body, True) for l in comps[c]):
        bodies.append(body)
  return bodies


def loop_collectives(hlo_text: str) -> list[dict]:
  """[{op, computation, line}] of every collective (async starts once) inside the loop bodies."""
  comps = computations(hlo_text)
  inside = set()
  for body in loop_bodies(comps):
    inside |= _reach(comps, body, False)
  out = []
  for c in sorted(inside):
    for line in comps[c]:
      op = _collective(line)
      if op:
        out.append({"op": op, "computation": c, "line": line.strip()})
  return out


def main(argv) -> int:
  from loopjax.train.config_load import load_config, split_config_args
  spec, overrides, rest = split_config_args(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mesh", required=True)
  p.add_argument("--topology", default="v5p:2x4x4")
  p.add_argument("--out", default=None)
  p.add_argument("--hlo-out", default=None)
  args = p.parse_args(rest)
  import jax
  jax.config.update("jax_platforms", "cpu")
  from loopjax.parallel import hlo
  from loopjax.parallel import mesh as mesh_lib
  from loopjax.parallel.topology import tpu_topology_devices
  from loopjax.train.memory import compile_train_step, parse_mesh, _optimized_hlo
  config = load_config(spec or "experiments/owt.py:loopmdm", overrides)
  devices = tpu_topology_devices(args.topology)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **parse_mesh(args.mesh)},
                            devices)
  dump = tempfile.mkdtemp(prefix="loopjax_hlo_")
  try:
    compiled, program = compile_train_step(config, mesh, dump)
    text = _optimized_hlo(compiled, dump)
  finally:
    shutil.rmtree(dump, ignore_errors=True)
  if args.hlo_out:
    with open(args.hlo_out, "w", encoding="utf-8") as f:
      f.write(text)
  m = compiled.memory_analysis()
  colls = hlo.collectives(text)
  inloop = loop_collectives(text)
  by_op = {}
  for c in inloop:
    by_op[c["op"]] = by_op.get(c["op"], 0) + 1
  in_bytes = sum(c["bytes"] for line in inloop for c in hlo.collectives(line["line"]))
  report = {"topology": args.topology, "mesh": args.mesh, "kernels": program.model.cfg.kernels,
            "overrides": overrides,
            "peak_gib": round(int(m.peak_memory_in_bytes) / 2 ** 30, 3),
            "collectives": len(colls), "collective_bytes": sum(c["bytes"] for c in colls),
            "loop_bodies": loop_bodies(computations(text)),
            "in_loop": len(inloop), "in_loop_by_op": by_op, "in_loop_bytes": in_bytes}
  print(json.dumps(report, indent=1))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
