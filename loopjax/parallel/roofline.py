"""A roofline estimate of a compiled train step: a lower bound on its time per chip generation.

Inputs, per device and per step: the FLOPs the chip executes, the bytes it moves to and from
HBM, and the bytes each collective sends over the chip interconnect (loopjax.parallel.hlo),
split into synchronous ones, asynchronous ones inside the model's loop and asynchronous ones
outside it. With the chip's published peaks:

    work      = max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth)
    step >=   max(f * work, async in-loop comm) + max((1 - f) * work, async other comm)
              + sync comm

where f is the loop's share of the work and comm = wire bytes / ICI bandwidth. Asynchronous
collectives overlap at best with the compute of their own region (the loop body or the rest),
synchronous ones not at all. The exposed share is (step - work) / step, and the MFU bound is
model FLOPs / (step x peak).

Limits: every engine is assumed to run at its peak (no launch gaps, no fusion or layout
overheads, perfect overlap within a region); the interconnect is assumed to deliver its full
per-chip bandwidth to every collective (a ring over one torus axis uses only some links), so
communication is under-estimated; HBM bytes are the compiler's count, which covers each `while`
body once (the layer scans and the loop), so they are under-estimated too. All of this keeps
the step time a lower bound and the MFU an upper bound.
"""

from __future__ import annotations

# generation -> (dense bf16 FLOP/s, HBM bytes/s, interconnect bytes/s one way per chip).
# TPU: Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e),
# "peak compute per chip (bf16)", "HBM bandwidth per chip" and half the "bidirectional ICI
# bandwidth per chip" (v5e 400, v5p 1200, v6e 800 GB/s); v4: its 3D torus's 6 ICI links of
# 400 Gb/s each way (the TPU v4 paper, Jouppi et al., ISCA 2023). GPU: NVIDIA H100 SXM and
# H200 SXM datasheets (nvidia.com/en-us/data-center/h100, /h200): dense BF16 tensor FLOP/s,
# HBM bandwidth, and half the 900 GB/s bidirectional NVLink bandwidth.
CHIPS = {
    "v4": (275e12, 1200e9, 300e9),
    "v5e": (197e12, 819e9, 200e9),
    "v5p": (459e12, 2765e9, 600e9),
    "v6e": (918e12, 1638e9, 400e9),
    "h100": (989e12, 3350e9, 450e9),
    "h200": (989e12, 4800e9, 450e9),
}
# device_kind prefix -> generation (most specific first).
_KINDS = (("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"),
          ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v4", "v4"),
          ("NVIDIA H100", "h100"), ("NVIDIA H200", "h200"))


def generation(device_kind: str) -> str | None:
  """The CHIPS key of a jax `device_kind`, or None for chips without published peaks here."""
  for prefix, gen in _KINDS:
    if device_kind.startswith(prefix):
      return gen
  return None


def estimate(gen: str, *, flops: float, hbm_bytes: float, model_flops: float,
             loop_share: float, sync_wire: float, async_loop_wire: float,
             async_other_wire: float) -> dict:
  """The bound of the module docstring for chip generation `gen` (a CHIPS key); all inputs per
  device per step. Returns seconds for each term, the step-time bound, the exposed
  communication share and the MFU bound."""
  if gen not in CHIPS:
    raise ValueError(f"no published peaks for chip {gen!r}; known: {', '.join(CHIPS)}")
  if not 0 <= loop_share <= 1:
    raise ValueError(f"loop_share must lie in [0, 1], got {loop_share}")
  peak, hbm, ici = CHIPS[gen]
  compute_s, hbm_s = flops / peak, hbm_bytes / hbm
  work = max(compute_s, hbm_s)
  sync_s, loop_s, other_s = sync_wire / ici, async_loop_wire / ici, async_other_wire / ici
  step = max(loop_share * work, loop_s) + max((1 - loop_share) * work, other_s) + sync_s
  return {"chip": gen, "peak_flops": peak, "hbm_bytes_per_s": hbm, "ici_bytes_per_s": ici,
          "compute_s": compute_s, "hbm_s": hbm_s, "comm_sync_s": sync_s,
          "comm_async_loop_s": loop_s, "comm_async_other_s": other_s,
          "bound": "compute" if compute_s >= hbm_s else "memory",
          "step_s_lower_bound": step,
          "exposed_comm_share": (step - work) / step if step > 0 else 0.0,
          "mfu_upper_bound": model_flops / (step * peak) if step > 0 else 0.0}
