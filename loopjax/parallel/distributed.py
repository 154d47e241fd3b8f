"""Multi-host start-up through JAX's own multi-controller runtime."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("loopjax")


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Calls jax.distributed.initialize when this is a multi-process run.

  Explicit flags win; otherwise TPU pods and SLURM jobs are auto-detected by JAX itself.
  A single process with none of these does nothing.
  """
  if coordinator is not None:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator needs --num-processes and --process-id")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif os.environ.get("SLURM_NTASKS", "1") != "1" or os.environ.get("TPU_WORKER_HOSTNAMES") or \
      os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  else:
    return
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
