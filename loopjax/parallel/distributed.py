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
  LOOPJAX_BARRIER_TIMEOUT=1800   seconds a process waits for the others: to connect at start-up,
                                 at a loopjax barrier (data set-up and compilation can differ a lot
                                 between hosts), at the final barrier and at JAX's shutdown barrier.
  LOOPJAX_HEARTBEAT_TIMEOUT=300  seconds without a heartbeat after which the coordination service
                                 declares a process dead and stops the job.

Barriers go through the coordination service, not through collectives: a CPU (gloo) collective
gives a late peer only 30 s to join (reduce-scatter on every call, the others on their first call,
when the communicators connect), which skewed start-up or compile times on a loaded host exceed.
So Orbax is switched to client barriers, and the trainer compiles its programs ahead of time and
meets at `barrier` right before its first step, with no per-process work between the two.

Stop requests of a multi-process job are agreed: SIGTERM is JAX's preemption notice, and every
process asks `reached_stop_step` at each step, so that all save the same step and exit 0.

`session` ends a command: on success the processes meet once more and disconnect together; on
an error the failing process exits at once (see there), so a launcher or the coordination service
stops its peers instead of everyone waiting out the shutdown timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback

import jax

from loopjax.errors import UserError

log = logging.getLogger("loopjax")


def _local_device_ids() -> list[int] | None:
  ids = os.environ.get("LOOPJAX_LOCAL_DEVICE_IDS", "").strip()
  return [int(x) for x in ids.split(",") if x.strip()] if ids else None


def _seconds(name: str, default: int) -> int:
  value = os.environ.get(name, "").strip() or str(default)
  try:
    seconds = int(float(value))
  except ValueError:
    seconds = 0
  if seconds < 1:
    raise ValueError(f"{name} must be a number of seconds >= 1, got {value!r}")
  return seconds


def barrier_timeout() -> int:
  """Seconds a process waits for its peers (LOOPJAX_BARRIER_TIMEOUT, default 1800)."""
  return _seconds("LOOPJAX_BARRIER_TIMEOUT", 1800)


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
  wait_s = barrier_timeout()
  timeouts = dict(initialization_timeout=wait_s, shutdown_timeout_seconds=wait_s,
                  heartbeat_timeout_seconds=_seconds("LOOPJAX_HEARTBEAT_TIMEOUT", 300))
  if coordinator is not None:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator needs --num-processes and --process-id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_ids, **timeouts)
  elif mode == "1" or (mode == "auto" and _cluster_detected()):
    jax.distributed.initialize(local_device_ids=local_ids, **timeouts)
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


def _coordination():
  """JAX's distributed state: the coordination-service client, process ids, the preemption sync
  manager. Private jax: the public `jax.distributed` (jax 0.10) offers only initialize,
  is_initialized and shutdown, and the public multihost helpers (sync_global_devices,
  broadcast_one_to_all) are device collectives, with no timeout and no strings; a barrier with a
  timeout and process 0's value in the key-value store need the client itself. Reading it needs
  no backend, unlike jax.process_index()."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state


def barrier(name: str) -> None:
  """Waits until every process reaches `name`; a no-op in a single-process run."""
  if jax.process_count() == 1:
    return
  _coordination().client.wait_at_barrier(name, timeout_in_ms=barrier_timeout() * 1000)


def from_process0(name: str, value: str | None = None) -> str | None:
  """Process 0's `value`, returned on every process (process 0 passes it, the others wait for
  it in the coordination service's key-value store); in a single-process run, `value`."""
  if jax.process_count() == 1:
    return value
  client = _coordination().client
  if jax.process_index() == 0:
    client.key_value_set(name, value or "")
    return value
  got = client.blocking_key_value_get(name, barrier_timeout() * 1000)
  return got or None


def uses_preemption_notices() -> bool:
  """Whether stop requests go through JAX's preemption service: a multi-process job, whose
  SIGTERM handler (installed by jax.distributed.initialize) records the notice and shares it."""
  state = _coordination()
  return state.client is not None and state.num_processes > 1 \
      and state.preemption_sync_manager is not None


def reached_stop_step(step: int) -> bool:
  """True, on every process at the same `step`, once any process got a preemption notice.

  Every process calls it at every step, with the same increasing step numbers: the service
  takes the largest step any process has reached when the notice spreads, plus one, as the
  step all of them stop at (jax.experimental.multihost_utils.reached_preemption_sync_point)."""
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)


@contextlib.contextmanager
def session(command: str):
  """Runs the body of `loopjax COMMAND` as this process's part of a multi-process job.

  Nothing happens in a single-process run. Otherwise, on success every process meets at a final
  barrier and then shuts the distributed runtime down, so JAX's shutdown barrier never waits for
  a peer still checkpointing or compiling. On an exception the process reports it (one line for
  a ValueError, FileNotFoundError or UserError, as the CLI does, else the traceback) and exits at once with
  a non-zero code, skipping the shutdown barrier: its peers may be blocked in a collective with
  it and would never arrive there, so waiting would only hide the error for the whole shutdown
  timeout (a final barrier that times out is such an exception). The launcher, or the
  coordination service when the heartbeats stop, ends the peers. An error every process raised
  together (its `agreed` attribute is true, e.g. a workdir held by another run) is the exception:
  then they all shut down together and exit with the same code.
  """
  if not jax.distributed.is_initialized():
    yield
    return
  try:
    yield
    barrier(f"loopjax_{command}_done")
  except BaseException as e:  # noqa: B036  (any exit of this process is the job's failure)
    if isinstance(e, (ValueError, FileNotFoundError, UserError)):
      print(f"loopjax {command}: error: {e}", file=sys.stderr)
      code = 2
    elif isinstance(e, SystemExit):
      code = e.code if isinstance(e.code, int) and e.code else 1
    elif isinstance(e, KeyboardInterrupt):  # Ctrl-C or a stop signal: one line, as the CLI does
      print(f"loopjax {command}: {e or 'interrupted'}", file=sys.stderr)
      code = getattr(e, "exit_code", 130)
    else:
      traceback.print_exc()
      code = 1
    state = _coordination()  # needs no backend, unlike jax.process_*
    if getattr(e, "agreed", False):  # every process raised it: leave together, cleanly
      sys.stderr.flush()
      try:
        jax.distributed.shutdown()
      finally:
        os._exit(code)
    print(f"loopjax {command}: process {state.process_id} of {state.num_processes} failed; "
          f"exiting with code {code} without waiting for the other processes", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  jax.distributed.shutdown()
