"""The collectives of a compiled program, read from its optimised HLO text.

After SPMD partitioning every array in the HLO has its per-device shape. This module lists the
collectives the TPU and GPU compilers emit, in these forms:

- synchronous ops: `all-reduce`, `all-gather`, `reduce-scatter`, `all-to-all`,
  `collective-permute`, `collective-broadcast`, `ragged-all-to-all`;
- asynchronous pairs: `<op>-start` / `<op>-done` (the start is the collective), and generic
  `async-start` / `async-done` wrapping a computation that holds one;
- TPU's reduce-scatter, emitted as a `fusion(kind=kCustom)` calling a computation named
  `all-reduce-scatter*` whose body all-reduces the full operand and keeps this device's slice;
- GPU custom calls to NCCL-style targets (`...AllReduce...`, `...AllGather...`).

For each it gives the op, the bytes of one execution (the larger of operand and result), how
many times a step runs it, whether it is asynchronous, the size of its replica group, and
whether it sits inside the model's loop: the call graph of computations is built from the text
(`while` bodies and conditions, `conditional` branches, fusions, calls, async wrappers), and a
computation is in the loop when it is reachable from the body of a `while` whose source scope
(`metadata op_name`) has the loop module's name as a path component. A `while` runs its body
the trip count the compiler recorded (`known_trip_count`) or read from its condition
(`compare(i, constant N), direction=LT`, also inside a fusion), else once; branches of a
`conditional` directly inside the loop's body run `loop_fraction` of the iterations (the
looped block runs under `cond(i < S)`, so E[S] / S_max of them).

A collective whose operand or result spans the global batch (the global token count, or the
global batch and length side by side) moves activations that should have been sharded; one that
spans this device's batch rows moves a per-shard activation, which tensor or sequence
parallelism calls for and a pure data/FSDP layout never does.
"""

from __future__ import annotations

import dataclasses
import math
import re

SYNC_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
            "collective-broadcast", "ragged-all-to-all")
_COMP = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
                    r"(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_SHAPE = re.compile(r"\b(?P<dtype>pred|token|[suf]\d+|bf16|f8\w*|c64|c128)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16, "token": 0}
_NCCL = (("allreduce", "all-reduce"), ("allgather", "all-gather"),
         ("reducescatter", "reduce-scatter"), ("alltoall", "all-to-all"),
         ("collectivepermute", "collective-permute"))


@dataclasses.dataclass
class Instr:
  name: str
  type: str
  op: str
  operands: list[str]
  attrs: str
  args: str = ""


def _itemsize(dtype: str) -> int:
  if dtype in _BYTES:
    return _BYTES[dtype]
  bits = re.match(r"[suf](\d+)", dtype)
  return max(1, int(bits[1]) // 8) if bits else 1


def shapes(type_text: str) -> list[tuple[str, list[int]]]:
  """[(dtype, dims)] of every array in an HLO type (a shape or a tuple of shapes)."""
  return [(s["dtype"], [int(d) for d in s["dims"].split(",") if d])
          for s in _SHAPE.finditer(type_text)]


def type_bytes(type_text: str) -> int:
  return sum(math.prod(d) * _itemsize(dt) for dt, d in shapes(type_text))


def _split_args(rest: str) -> tuple[str, str]:
  """(operand list, attributes) of the text after `op(`."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ""


def _instr(m: re.Match) -> Instr:
  args, attrs = _split_args(m["rest"])
  return Instr(m["name"], m["type"], m["op"], re.findall(r"%([\w.\-]+)", args), attrs, args)


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str | None]:
  """({computation name: its instructions}, name of the ENTRY computation)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m:
        current = comps.setdefault(m["name"], [])
        entry = m["name"] if m["entry"] else entry
        continue
      # Instructions outside any computation (a snippet of lines): one unnamed computation.
      m = _INSTR.match(line)
      if m:
        comps.setdefault("", []).append(_instr(m))
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      current.append(_instr(m))
    elif current:  # an attribute (e.g. a kernel's metadata) that spans several lines
      current[-1].attrs += "\n" + line
  return comps, entry if entry is not None or "" not in comps else ""


def _called(ins: Instr) -> list[tuple[str, str]]:
  """[(role, computation)] that `ins` calls: body / condition / branch / call."""
  out = []
  for key in ("body", "condition", "calls", "to_apply", "true_computation",
              "false_computation"):
    for m in re.finditer(rf"\b{key}=%([\w.\-]+)", ins.attrs):
      out.append((key if key in ("body", "condition") else
                  "branch" if key.endswith("_computation") else "call", m[1]))
  for key in ("branch_computations", "called_computations"):
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", ins.attrs)
    if m:
      role = "branch" if key == "branch_computations" else "call"
      out += [(role, c) for c in re.findall(r"%([\w.\-]+)", m[1])]
  return out


def _op_name(ins: Instr) -> str:
  m = re.search(r'op_name="([^"]*)"', ins.attrs)
  return m[1] if m else ""


def _is_loop_scope(op_name: str, scope: str) -> bool:
  return scope in op_name.split("/")


def _group_size(attrs: str) -> int | None:
  """Devices in one replica group, from the forms XLA prints."""
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len([x for x in m[1].split(",") if x])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m[1]))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m[2]) if a in sizes)
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:
    return int(m[1].split(",")[-1])
  return None


@dataclasses.dataclass
class _Found:
  op: str
  ins: Instr
  comp: str
  is_async: bool
  operand_bytes: int
  result_bytes: int


def _collect(comps: dict[str, list[Instr]]) -> list[_Found]:
  """Every collective once, with the computation it runs from; the inner collective of an
  async wrapper or a TPU reduce-scatter fusion is reported as its caller."""
  types = {c: {i.name: i.type for i in body} for c, body in comps.items()}
  done_of = {}  # start name -> done instruction
  for body in comps.values():
    for i in body:
      if i.op.endswith("-done") and i.operands:
        done_of[i.operands[0]] = i
  inner_op = {}  # computation -> first collective op inside it
  for c, body in comps.items():
    for i in body:
      base = i.op[:-len("-start")] if i.op.endswith("-start") else i.op
      if base in SYNC_OPS:
        inner_op.setdefault(c, base)
  wrapped = set()
  found = []
  for c, body in comps.items():
    for i in body:
      def operand_bytes(ins=i, comp=c):
        return sum(type_bytes(types[comp].get(o, "")) for o in ins.operands)
      calls = [callee for role, callee in _called(i) if role == "call"]
      if i.op == "fusion" and "kind=kCustom" in i.attrs and calls and calls[0] in inner_op:
        wrapped.add(calls[0])
        op = ("reduce-scatter" if calls[0].startswith("all-reduce-scatter")
              else inner_op[calls[0]])
        found.append(_Found(op, i, c, False, operand_bytes(), type_bytes(i.type)))
      elif i.op == "async-start" and calls and calls[0] in inner_op:
        wrapped.add(calls[0])
        done = done_of.get(i.name)
        found.append(_Found(inner_op[calls[0]], i, c, True, operand_bytes(),
                            type_bytes(done.type) if done else 0))
      elif i.op.endswith("-start") and i.op[:-len("-start")] in SYNC_OPS:
        done = done_of.get(i.name)
        result = type_bytes(done.type) if done else max(
            (math.prod(d) * _itemsize(dt) for dt, d in shapes(i.type)), default=0)
        found.append(_Found(i.op[:-len("-start")], i, c, True, operand_bytes(), result))
      elif i.op in SYNC_OPS:
        found.append(_Found(i.op, i, c, False, operand_bytes(), type_bytes(i.type)))
      elif i.op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', i.attrs)
        key = re.sub(r"[^a-z]", "", target[1].lower()) if target else ""
        for pat, op in _NCCL:
          if pat in key:
            found.append(_Found(op, i, c, "start" in key, operand_bytes(), type_bytes(i.type)))
            break
  return [f for f in found if f.comp not in wrapped]


def _walk(comps, entry, loop_scope: str, loop_fraction: float):
  """{computation: (runs per step, in the loop)} over the call graph from `entry`."""
  callers = {}  # child -> [(parent, factor, enters loop)]
  for c, body in comps.items():
    for i in body:
      called = _called(i)
      loop_while = i.op == "while" and _is_loop_scope(_op_name(i), loop_scope)
      trip = None
      if i.op == "while":
        cond = next((callee for role, callee in called if role == "condition"), None)
        known = re.search(r'known_trip_count"?:\{"n":"(\d+)"', i.attrs)
        trip = int(known[1]) if known else _trip_count_of(comps.get(cond, []), comps)
      loop_cond = (i.op == "conditional" and _is_loop_scope(_op_name(i), loop_scope)
                   and _op_name(i).split("/").count("while") == _loop_whiles(_op_name(i),
                                                                               loop_scope))
      for role, callee in called:
        factor = 1.0
        if role == "body":
          factor = float(trip or 1)
        elif role == "branch" and loop_cond:
          factor = loop_fraction
        callers.setdefault(callee, []).append((c, factor, loop_while and role == "body"))
  runs, in_loop = {}, {}

  def visit(c, stack=()):
    if c in runs:
      return
    if c == entry or c not in callers:
      runs[c], in_loop[c] = (1.0 if c == entry else 0.0), False
      return
    total, loop = 0.0, False
    for parent, factor, enters in callers[c]:
      if parent in stack:
        continue
      visit(parent, stack + (c,))
      total += runs[parent] * factor
      loop |= in_loop[parent] or enters
    runs[c], in_loop[c] = total, loop

  for c in comps:
    visit(c)
  return runs, in_loop


def _loop_whiles(op_name: str, scope: str) -> int:
  """`while` components up to and including the loop's own, the first after the loop's scope
  (`.../loop/while`, or `.../loop/vmap()/while` when the loop runs under a vmap)."""
  parts = op_name.split("/")
  idx = parts.index(scope)
  own = next((i for i in range(idx, len(parts)) if parts[i] == "while"), len(parts) - 1)
  return parts[:own + 1].count("while")


def _trip_count_of(cond: list[Instr], comps: dict[str, list[Instr]]) -> int | None:
  """N of a `while` condition `i < N` (XLA's counted loops start at 0): a `compare` with
  direction=LT against a constant, also inside a fusion of the condition; None otherwise."""
  consts = {i.name: int(i.args) for i in cond
            if i.op == "constant" and re.fullmatch(r"\s*-?\d+\s*", i.args)}
  for i in cond:
    lt = i.op == "compare" and "direction=LT" in i.attrs
    if i.op == "fusion":
      called = [c for role, c in _called(i) if role == "call"]
      lt = any(j.op == "compare" and "direction=LT" in j.attrs
               for c in called for j in comps.get(c, []))
    if lt:
      for o in i.operands:
        if o in consts:
          return consts[o]
  return None


# Bytes each device sends per byte of the collective's (larger) buffer, for a group of n, with
# the bandwidth-optimal (ring) algorithms: gather/scatter send (n-1)/n of it, an all-reduce is a
# reduce-scatter plus an all-gather, a permute sends its whole operand.
def _wire_factor(op: str, n: int | None) -> float:
  share = 1.0 if not n else (n - 1) / n
  return {"all-reduce": 2 * share, "collective-permute": 1.0,
          "collective-broadcast": 1.0}.get(op, share)


def collectives(hlo_text: str, *, loop_scope: str = "loop",
                loop_fraction: float = 1.0) -> list[dict]:
  """Every collective of an optimised HLO module (see module docstring), one dict each:
  op, name, async, in_loop, runs (executions per step), bytes (one execution: the larger of
  operand and result), wire_bytes (sent per device per execution), group (devices in its
  replica group, None if not printed), shapes / dtypes (operand and result arrays) and scope
  (the source op_name). `loop_fraction`: share of the loop's iterations that run its block."""
  comps, entry = parse_module(hlo_text)
  runs, in_loop = _walk(comps, entry, loop_scope, loop_fraction)
  types = {c: {i.name: i.type for i in body} for c, body in comps.items()}
  out = []
  for f in _collect(comps):
    arrays = [s for s in shapes(f.ins.type) if s[1]]
    for o in f.ins.operands:
      arrays += [s for s in shapes(types[f.comp].get(o, "")) if s[1]]
    group = _group_size(f.ins.attrs)
    nbytes = max(f.operand_bytes, f.result_bytes)
    out.append({"op": f.op, "name": f.ins.name, "async": f.is_async,
                "in_loop": bool(in_loop.get(f.comp)), "runs": runs.get(f.comp, 1.0),
                "bytes": nbytes, "wire_bytes": nbytes * _wire_factor(f.op, group),
                "group": group, "shapes": [d for _, d in arrays],
                "dtypes": [dt for dt, _ in arrays], "scope": _op_name(f.ins)})
  return out


def _spans(dims: list[int], rows: int, lengths: tuple[int, ...], merged: bool = False) -> bool:
  """Whether `dims` hold `rows` sequences of one of `lengths` tokens side by side (or, with
  `merged`, as one dimension of rows x length tokens)."""
  for length in lengths:
    if (merged and rows * length in dims) or any(a == rows and b == length
                                                 for a, b in zip(dims, dims[1:])):
      return True
  return False


def is_activation_sized(dims: list[int], batch: int, length: int) -> bool:
  """Whether a per-device shape still spans the global batch of `batch` x `length` tokens."""
  return _spans(dims, batch, (length,), merged=True)


def classify(colls: list[dict], *, batch: int, length: int, batch_shards: int,
             tensor: int = 1) -> list[dict]:
  """Adds `activation` ("global": spans the global batch; "per_shard": spans this device's
  batch / batch_shards rows, over the full length or 1/tensor of it; None) and `expected` (why
  the mesh calls for it, or None) to each collective. Tensor parallelism all-reduces, gathers
  and scatters per-shard activations over its `tensor` devices; nothing else should move one."""
  rows = batch // max(batch_shards, 1)
  lengths = (length, length // tensor) if tensor > 1 and length % tensor == 0 else (length,)
  for c in colls:
    # A merged rows x length dimension is only trusted for the global batch: a device's few
    # rows times the length (e.g. 8 x 1024) is also a common weight dimension.
    if any(_spans(d, batch, (length,), merged=True) for d in c["shapes"]):
      c["activation"] = "global"
    elif rows != batch and any(_spans(d, rows, lengths) for d in c["shapes"]):
      c["activation"] = "per_shard"
    else:
      c["activation"] = None
    c["expected"] = None
    if (c["activation"] == "per_shard" and tensor > 1 and c["group"] in (tensor, None)
        and c["op"] in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                        "collective-permute")):
      c["expected"] = f"tensor parallelism (tensor={tensor}) moves per-shard activations"
  return colls


def activation_collectives(colls: list[dict], batch: int, length: int) -> list[dict]:
  """The collectives whose operand or result spans the global batch (see module docstring)."""
  return [c for c in colls if any(is_activation_sized(d, batch, length) for d in c["shapes"])]


def totals(colls: list[dict]) -> dict:
  """Per step: instructions, executions, bytes, wire bytes; and the in-loop and synchronous
  shares of them."""
  def part(cs):
    return {"count": len(cs), "runs": sum(c["runs"] for c in cs),
            "bytes": sum(c["bytes"] * c["runs"] for c in cs),
            "wire_bytes": sum(c["wire_bytes"] * c["runs"] for c in cs)}
  by_op = {}
  for c in colls:
    by_op[c["op"]] = by_op.get(c["op"], 0) + 1
  return {**part(colls), "by_op": dict(sorted(by_op.items())),
          "in_loop": part([c for c in colls if c["in_loop"]]),
          "sync": part([c for c in colls if not c["async"]]),
          "async": part([c for c in colls if c["async"]])}
