"""Attention's six batched products in each arrangement the xla_cpu kernels can give them.

XLA:CPU sends a dot to YNNPACK when its left operand is contracted on its last axis and to Eigen
otherwise. For attention's small per-head products (B*H matrices of L x L x K) the two differ a
lot, and differently per dtype: this times every product in the row-major form ("ynn") and in
the transposed-left-operand form ("eigen") through `xla_cpu.bdot`, the function the kernel uses,
interleaved round by round, and prints GFLOP/s per form with the library XLA chose. The kernel's
choice (`xla_cpu.eigen_forms`) takes the eigen forms for float32 on CPU; o = e v and
dq = ds k have no eigen form without a transposed L x L operand, so they stay row-major.

  python benchmarks/attention_forms.py                     # reference config: B 8, H 8, L 256, K 64
  python benchmarks/attention_forms.py --dtypes float32 --repeats 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from perf_common import ensure_malloc_tuning  # noqa: E402

# product: (row-major form, its operands; transposed-left form, its operands). Operand names:
# "x" = B x H x L x K, "xT" = B x H x K x L, "p" = B x H x L x L.
PRODUCTS = {
    "s = q k^T": (("bhqk,bhtk->bhqt", "x", "x"), ("bhkq,bhtk->bhqt", "xT", "x")),
    "o = e v": (("bhqt,bhtk->bhqk", "p", "x"), None),
    "dv^T = do^T e": (("bhkq,bhqt->bhkt", "xT", "p"), ("bhqk,bhqt->bhkt", "x", "p")),
    "dp = do v^T": (("bhqk,bhtk->bhqt", "x", "x"), ("bhkq,bhtk->bhqt", "xT", "x")),
    "dq = ds k": (("bhqt,bhtk->bhqk", "p", "x"), None),
    "dk^T = q^T ds": (("bhkq,bhqt->bhkt", "xT", "p"), ("bhqk,bhqt->bhkt", "x", "p")),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--repeats", type=int, default=11)
  p.add_argument("--glibc-defaults", action="store_true")
  p.add_argument("--json", default="attention_forms.json")
  args = p.parse_args(argv)
  ensure_malloc_tuning()

  import jax
  import jax.numpy as jnp

  from common import kernel_set, machine, write_json
  from loopjax.model.kernels import xla_cpu

  b, h, length, k = args.batch, args.heads, args.length, args.head_dim
  shapes = {"x": (b, h, length, k), "xT": (b, h, k, length), "p": (b, h, length, length)}
  flop = 2.0 * b * h * length * length * k
  fns = {}
  for dt in args.dtypes.split(","):
    for name, forms in PRODUCTS.items():
      for form, spec in zip(("ynn", "eigen"), forms):
        if spec is None:
          continue
        eq, a, c = spec
        ops = [jax.random.normal(jax.random.PRNGKey(i), shapes[n], jnp.float32).astype(dt)
               for i, n in enumerate((a, c))]
        f = jax.jit(lambda x, y, eq=eq, e=form == "eigen": xla_cpu.bdot(eq, x, y, e))
        compiled = f.lower(*ops).compile()
        lib = "YNNPACK" if "__ynn_fusion" in compiled.as_text() else "Eigen"
        jax.block_until_ready(compiled(*ops))
        fns[(dt, name, form)] = dict(fn=compiled, ops=ops, lib=lib, times=[])
  for _ in range(args.repeats):
    for d in fns.values():
      ts = []
      for _ in range(3):  # best of 3 back-to-back calls, median over rounds
        t = time.perf_counter()
        jax.block_until_ready(d["fn"](*d["ops"]))
        ts.append(time.perf_counter() - t)
      d["times"].append(min(ts))

  print(f"machine: {machine()}; B {b}, H {h}, L {length}, K {k}: {flop / 1e9:.2f} GFLOP each")
  print(f"{'dtype':>9} {'product':>14} {'form':>6} {'library':>8} {'ms':>7} {'GFLOP/s':>8}")
  rows = []
  for (dt, name, form), d in fns.items():
    med = statistics.median(d["times"])
    rows.append(dict(dtype=dt, product=name, form=form, library=d["lib"], ms=med * 1e3,
                     gflops=flop / med / 1e9, times=d["times"]))
    print(f"{dt:>9} {name:>14} {form:>6} {d['lib']:>8} {med * 1e3:>7.2f} {flop / med / 1e9:>8.1f}")
  ms = {(r["dtype"], r["product"], r["form"]): r["ms"] for r in rows}

  def total(dt, eigen: bool) -> float:  # each product in its eigen form where it has one
    return sum(ms[(dt, name, "eigen" if eigen and forms[1] else "ynn")]
               for name, forms in PRODUCTS.items())

  for dt in args.dtypes.split(","):
    model = total(dt, xla_cpu.eigen_forms(jnp.dtype(dt)))
    print(f"{dt}: all six row-major {total(dt, False):.1f} ms, with the eigen forms "
          f"{total(dt, True):.1f} ms; the xla_cpu kernel's choice {model:.1f} ms")
  path = write_json(args.json, dict(machine=machine(), args=vars(args), rows=rows),
                    kernels=kernel_set("xla_cpu"))  # its batched-matmul forms, called directly
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
