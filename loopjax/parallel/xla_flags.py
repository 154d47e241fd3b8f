"""XLA / libtpu flag sets per accelerator generation: the one table every launcher reads.

    python -m loopjax.cli.xla_flags v5p            # the flags, one line (LIBTPU_INIT_ARGS)
    python -m loopjax.cli.xla_flags v5litepod-32   # accelerator types and topologies work too
    python -m loopjax.cli.xla_flags gpu            # XLA_FLAGS for GPU clusters
    python -m loopjax.cli.xla_flags v5p --env      # LIBTPU_INIT_ARGS='...' for `export`

This module imports nothing but the standard library (launchers read it without jax).

TPU sets go into LIBTPU_INIT_ARGS, which libtpu parses once, when the process loads it; GPU sets
go into XLA_FLAGS. Both parsers refuse unknown flags, and the TPU compiler refuses some flags on
some generations (continuation fusion of collectives into compute is accepted on v5e only: on
v4, v5p and v6e the compile fails with FAILED_PRECONDITION), so every set here is compiled for
its generation by tests/test_tpu_compile.py. The sets follow MaxText's per-generation benchmark
configs and GPU recipes, restricted to what the pinned libtpu/jaxlib accept:

- data-parallel all-reduce pipelining across steps (all TPUs);
- asynchronous all-gather / all-reduce / collective-permute, overlapped with compute on the
  TensorCore (all TPUs): FSDP's per-layer weight gathers run while the previous layer computes;
- v5e: continuation fusion of all-gathers into the consuming fusion;
- v6e: reduce-scatter layout assignment and a larger scoped VMEM for compute-bound fusions;
- GPU: the latency-hiding scheduler, pipelined all-gather / reduce-scatter / all-reduce across
  loop iterations, combine thresholds large enough to merge one layer's collectives, and double
  buffering of while loops (the looped block's scan).
"""

from __future__ import annotations

import sys
import re

_DATA_PARALLEL = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)
_ASYNC_OVERLAP = (
    "--xla_enable_async_all_gather=true",
    "--xla_enable_async_all_reduce=true",
    "--xla_enable_async_collective_permute=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
)
_FUSE_ALL_GATHER = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
)
_REDUCE_SCATTER_LAYOUT = (
    "--xla_tpu_use_minor_sharding_for_major_trivial_input=true",
    "--xla_tpu_relayout_group_size_threshold_for_reduce_scatter=1",
    "--xla_tpu_assign_all_reduce_scatter_layout=true",
)

TPU_FLAGS: dict[str, tuple[str, ...]] = {
    "v4": _DATA_PARALLEL + _ASYNC_OVERLAP,
    "v5e": _DATA_PARALLEL + _ASYNC_OVERLAP + _FUSE_ALL_GATHER,
    "v5p": _DATA_PARALLEL + _ASYNC_OVERLAP,
    "v6e": _DATA_PARALLEL + _ASYNC_OVERLAP + _REDUCE_SCATTER_LAYOUT
           + ("--xla_tpu_scoped_vmem_limit_kib=98304",),
}

GPU_FLAGS: tuple[str, ...] = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_all_reduce_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)

GENERATIONS = tuple(TPU_FLAGS) + ("gpu",)

# Names of a generation: topology prefixes (v5e:2x4), accelerator types (v5litepod-32, v5p-64)
# and device kinds (TPU v5 lite, TPU v5), matched after dropping a leading "tpu ".
_NAME_PATTERNS = (
    (r"v5e|v5 ?lite", "v5e"), (r"v6e|v6 ?lite", "v6e"), (r"v5p|v5(?![a-z])", "v5p"),
    (r"v4(?![a-z])", "v4"), (r"gpu|cuda", "gpu"),
)


def generation(name: str) -> str:
  """The table's key for a generation, topology (`v5p:2x4x4`), accelerator type (`v5p-64`,
  `v5litepod-32`) or device kind (`TPU v5 lite`)."""
  text = re.sub(r"^tpu\s*", "", name.strip().lower())
  for pattern, gen in _NAME_PATTERNS:
    if re.match(pattern, text):
      return gen
  raise ValueError(f"unknown accelerator generation {name!r}: use one of "
                   f"{', '.join(GENERATIONS)}, a topology such as v5p:2x4x4, or an accelerator "
                   "type such as v5litepod-32")


def flags(name: str) -> tuple[str, ...]:
  gen = generation(name)
  return GPU_FLAGS if gen == "gpu" else TPU_FLAGS[gen]


def env_var(name: str) -> str:
  """The environment variable the flags of `name` go into."""
  return "XLA_FLAGS" if generation(name) == "gpu" else "LIBTPU_INIT_ARGS"


def flag_string(name: str) -> str:
  return " ".join(flags(name))


if __name__ == "__main__":  # the command moved to loopjax/cli/: one line naming it, exit 2
  print(f"{__spec__.name if __spec__ else __file__} is a library module now: run python -m loopjax.cli.xla_flags ...",
        file=sys.stderr)
  sys.exit(2)
