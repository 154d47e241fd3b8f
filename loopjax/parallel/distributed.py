"""Multi-host start-up through JAX's own multi-controller runtime.

Every process runs the same `loopjax train` command. Processes find each other through
`jax.distributed.initialize`, from explicit flags (`--coordinator host:port --num-processes N
--process-id I`, as launch/local_multiprocess.py passes) or from the cluster environment that JAX
detects itself (SLURM `srun`, Cloud TPU VMs and GKE, multi-slice TPU).

Environment knobs (launch scripts set them):
  LOOPJAX_DISTRIBUTED=auto|1|0   1: always initialise with JAX's cluster auto-detection (Cloud TPU
                                 VMs created with gcloud carry no environment variable to detect
                                 them by); 0: never; auto (default): when flags or SLURM / TPU
                                 variables say this is a multi-process job.
  LOOPJAX_LOCAL_DEVICE_IDS=0,1,..  the accelerators this process drives. JAX's SLURM detection
                                 gives each task one GPU (its SLURM_LOCALID); one task per node
                                 driving all of the node's GPUs must list them.
  LOOPJAX_BARRIER_TIMEOUT=1800   seconds a process waits at a start-up barrier for the others
                                 (data set-up and compilation can differ a lot between hosts).

Barriers go through the coordination service, not through collectives: a CPU (gloo) collective
gives a late peer only 30 s to join its first call, which skewed start-up or compile times on a
loaded host exceed. So Orbax is switched to client barriers, and the trainer compiles its
programs ahead of time and meets at `barrier` before the first collective runs.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("loopjax")


def _local_device_ids() -> list[int] | None:
  ids = os.environ.get("LOOPJAX_LOCAL_DEVICE_IDS", "").strip()
  return [int(x) for x in ids.split(",") if x.strip()] if ids else None


def _cluster_detected() -> bool:
  return (os.environ.get("SLURM_NTASKS", "1") != "1" or bool(os.environ.get("TPU_WORKER_HOSTNAMES"))
          or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")))


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Calls jax.distributed.initialize when this is a multi-process run.

  Explicit flags win; otherwise SLURM jobs and TPU pods are auto-detected by JAX itself.
  A single process with none of these does nothing.
  """
  mode = os.environ.get("LOOPJAX_DISTRIBUTED", "auto").strip().lower()
  if mode not in ("auto", "1", "0"):
    raise ValueError(f"LOOPJAX_DISTRIBUTED must be auto, 1 or 0, got {mode!r}")
  local_ids = _local_device_ids()
  if coordinator is not None:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator needs --num-processes and --process-id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_ids)
  elif mode == "1" or (mode == "auto" and _cluster_detected()):
    jax.distributed.initialize(local_device_ids=local_ids)
  else:
    return
  _orbax_client_barriers()
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def _orbax_client_barriers() -> None:
  """Makes Orbax's own barriers wait on the coordination service (with a timeout)."""
  from absl import flags
  import orbax.checkpoint  # noqa: F401  (defines the flag)
  flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
  flag.value = True
  # Readable without parsing argv through absl (loopjax has its own command line).
  flag.present = 1


def barrier(name: str) -> None:
  """Waits until every process reaches `name`; a no-op in a single-process run."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the client JAX itself initialised
  timeout_s = float(os.environ.get("LOOPJAX_BARRIER_TIMEOUT", "1800"))
  jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))
