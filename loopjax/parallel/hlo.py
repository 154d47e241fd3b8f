"""The collectives of a compiled program, read from its HLO text.

After SPMD partitioning every array in the HLO has its per-device shape. A collective whose
operand or result still spans the global batch (a dimension equal to the global token count,
or the global batch and length side by side) moves activations between devices: the layout
replicated activations instead of sharding them over the batch.
"""

from __future__ import annotations

import math
import re

_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
                    r"(?P<op>" + "|".join(_OPS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(?P<dtype>pred|[suf]\d+|bf16|f8\w*|c64|c128)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def _itemsize(dtype: str) -> int:
  if dtype in _BYTES:
    return _BYTES[dtype]
  bits = re.match(r"[suf](\d+)", dtype)
  return max(1, int(bits[1]) // 8) if bits else 1


def collectives(hlo_text: str) -> list[dict]:
  """[{op, name, shapes: [[dims...]], dtypes, bytes}] of every collective (async starts once)."""
  out = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    shapes = [(s["dtype"], [int(d) for d in s["dims"].split(",") if d])
              for s in _SHAPE.finditer(m["type"])]
    # Async starts return (operand, result, context scalars): keep the arrays, not the scalars.
    arrays = [(dt, dims) for dt, dims in shapes if dims] or shapes
    out.append({"op": m["op"], "name": m["name"], "shapes": [dims for _, dims in arrays],
                "dtypes": [dt for dt, _ in arrays],
                "bytes": max((math.prod(d) * _itemsize(dt) for dt, d in arrays), default=0)})
  return out


def is_activation_sized(dims: list[int], batch: int, length: int) -> bool:
  """Whether a per-device shape still spans the global batch of `batch` x `length` tokens."""
  if batch * length in dims:
    return True
  return any(a == batch and b == length for a, b in zip(dims, dims[1:]))


def activation_collectives(colls: list[dict], batch: int, length: int) -> list[dict]:
  """The collectives whose operand or result spans the global batch (see module docstring)."""
  return [c for c in colls if any(is_activation_sized(d, batch, length) for d in c["shapes"])]
