#!/usr/bin/env bash
# Train loopjax on Cloud TPU VMs, one slice or several: every worker runs the same `loopjax train`.
#
#   launch/tpu_pod.sh all     [-- --config.train.steps=1000 ...]   create, copy, install, train
#   launch/tpu_pod.sh run     [-- ...]   the same in the foreground, re-creating a preempted spot
#                                        queued resource and resuming, up to MAX_ATTEMPTS times
#   launch/tpu_pod.sh create | copy | install | train [-- ...] | logs | stop | delete | ssh | status
#   DRY_RUN=1 launch/tpu_pod.sh ...      print every command instead of running it
#
# Edit the variables below (or set them in the environment). WORKDIR should be a gs:// bucket
# path the TPU VMs can write (Orbax writes checkpoints there from every worker; metrics and
# config.json come from worker 0), so the run survives the VMs being deleted or preempted.
# Re-running `train` with the same WORKDIR resumes from the newest checkpoint.
set -euo pipefail

PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-west4-a}"
TPU_NAME="${TPU_NAME:-loopjax-v5e-32}"                     # the queued resource (and 1-slice node)
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-32}"     # per slice: v4-32, v5p-64, v6e-16, ...
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"  # tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e
NUM_SLICES="${NUM_SLICES:-1}"      # > 1: multi-slice (a queued resource of NUM_SLICES nodes)
NODE_PREFIX="${NODE_PREFIX:-$TPU_NAME}"  # multi-slice nodes are NODE_PREFIX-0 .. NODE_PREFIX-(N-1)
QUEUED="${QUEUED:-1}"              # 1: queued resource (waits for capacity); 0: tpu-vm create
SPOT="${SPOT:-0}"                  # 1: spot capacity (`run` re-creates it when preempted)
MAX_ATTEMPTS="${MAX_ATTEMPTS:-20}" # `run`: create + train attempts before giving up
CONFIG="${CONFIG:-experiments/sudoku.py}"
WORKDIR="${WORKDIR:-gs://my-bucket/loopjax/${TPU_NAME}}"
REMOTE_DIR="${REMOTE_DIR:-loopjax}"      # relative to the home directory on each worker
PYTHON="${PYTHON:-3.11}"                 # uv installs this Python on every worker (images ship 3.10)
VENV="${VENV:-.venv-loopjax}"            # relative to the home directory on each worker
MEGASCALE_PORT="${MEGASCALE_PORT:-8080}" # multi-slice: the DCN runtime's coordinator port
DRY_RUN="${DRY_RUN:-0}"
# JAX's persistent compilation cache: a restarted or resumed job skips the compile.
COMPILE_CACHE="${COMPILE_CACHE:-$WORKDIR/jax_cache}"
DETACH="${DETACH:-1}"                    # `train`: 1 runs under nohup (follow with `logs`)
LOG="${LOG:-loopjax_train.log}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The generation's flags from the one table (loopjax/parallel/xla_flags.py, printed by
# loopjax.cli.xla_flags; plain Python, so no jax is needed here); LIBTPU_INIT_ARGS in the
# environment replaces them.
if [[ -z "${LIBTPU_INIT_ARGS+set}" ]]; then
  LIBTPU_INIT_ARGS="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python3 -m loopjax.cli.xla_flags "$ACCELERATOR_TYPE")"
fi
ACTION="${1:-all}"
shift || true
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")
if [[ "$NUM_SLICES" -gt 1 ]]; then
  [[ "$QUEUED" == 1 ]] || { echo "NUM_SLICES=$NUM_SLICES needs QUEUED=1 (multi-slice is a queued resource)" >&2; exit 2; }
  NODES=(); for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$NODE_PREFIX-$i"); done
else
  NODES=("$TPU_NAME")
fi

# Every command that touches the cloud goes through `x` (or `query`, which also returns its
# output): DRY_RUN=1 prints it to the script's stdout (fd 3, also from inside `$(...)`), one
# line, shell-quoted, instead of running it; progress messages go to stderr.
exec 3>&1
x() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@" | sed 's/ $//' >&3; echo >&3; else "$@"; fi
}
query() {  # query DRY_RUN_ANSWER cmd...
  local answer="$1"; shift
  if [[ "$DRY_RUN" == 1 ]]; then x "$@"; echo "$answer"; else "$@"; fi
}
gc() { x gcloud --project "$PROJECT" "$@"; }
on_node() { gc compute tpus tpu-vm ssh "$1" --zone "$ZONE" --worker=all --command "$2"; }
on_all() {  # every worker of every slice, the slices in parallel
  local node pids=()
  for node in "${NODES[@]}"; do
    if [[ "$DRY_RUN" == 1 || ${#NODES[@]} == 1 ]]; then on_node "$node" "$1"
    else on_node "$node" "$1" & pids+=($!); fi
  done
  local pid status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}

qr_state() {
  query ACTIVE gcloud --project "$PROJECT" compute tpus queued-resources describe "$TPU_NAME" \
    --zone "$ZONE" --format='value(state.state)'
}

create() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  if [[ "$QUEUED" == 1 ]]; then
    local nodes=(--node-id "$TPU_NAME")
    [[ "$NUM_SLICES" -gt 1 ]] && nodes=(--node-count "$NUM_SLICES" --node-prefix "$NODE_PREFIX")
    gc compute tpus queued-resources create "$TPU_NAME" "${nodes[@]}" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${spot[@]}"
    echo "waiting for queued resource $TPU_NAME to become ACTIVE ..." >&2
    while true; do
      state="$(qr_state)"
      echo "  $(date +%T) $state" >&2
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) echo "queued resource is $state" >&2; return 1 ;;
      esac
      sleep 30
    done
  else
    gc compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${spot[@]}"
  fi
}

copy() {
  # The tracked files plus uncommitted edits, without ignored files and without the top-level
  # corpus and run folders (data/, raw/, runs/, workdirs/): workers read data from gs://.
  local tarball="${TMPDIR:-/tmp}/loopjax-$TPU_NAME.tar.gz" node
  x bash -c "cd $(printf '%q' "$ROOT") && git ls-files -z --cached --others --exclude-standard \
| grep -zv -E '^(data|raw|runs|workdirs)/' | tar czf $tarball --null -T -"
  for node in "${NODES[@]}"; do
    gc compute tpus tpu-vm scp "$tarball" "$node":loopjax.tar.gz --zone "$ZONE" --worker=all
  done
  on_all "mkdir -p ~/$REMOTE_DIR && tar xzf ~/loopjax.tar.gz -C ~/$REMOTE_DIR"
  x rm -f "$tarball"
}

install() {
  # The TPU images' system Python is 3.10; jax/flax/orbax/grain need >= 3.11. uv installs a
  # standalone Python and the pinned packages (launch/constraints.txt) into a venv.
  on_all "set -e; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; cd ~/$REMOTE_DIR; \
uv venv --python $PYTHON --allow-existing ~/$VENV; \
VIRTUAL_ENV=~/$VENV uv pip install -c launch/constraints.txt -e '.[tpu,gcs]' requests; \
~/$VENV/bin/python -c 'import jax, loopjax; print(\"jax\", jax.__version__)'"
}

cleanup() {
  # A killed or preempted run can leave a process holding the chips (/dev/accel* on v4/v5e,
  # /dev/vfio/* on v5p/v6e) and libtpu's lock file, and the next run then fails to open the TPU.
  on_all "sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9; \
sudo rm -f /tmp/libtpu_lockfile"
}

train_cmd() {  # train_cmd SLICE_ID: the command every worker of that slice runs
  # LOOPJAX_DISTRIBUTED=1: gcloud-created TPU VMs have no environment variable that tells
  # JAX it is one of several workers; this makes every worker call jax.distributed.initialize,
  # which reads the MEGASCALE_* variables to join the slices into one job.
  local args="" flags env=""
  [[ ${#EXTRA[@]} -gt 0 ]] && args="$(printf '%q ' "${EXTRA[@]}")"
  flags="$(printf '%q' "$LIBTPU_INIT_ARGS")"  # escaped, no quotes: survives `bash -c '...'`
  if [[ "$NUM_SLICES" -gt 1 ]]; then
    env="MEGASCALE_COORDINATOR_ADDRESS=$COORDINATOR:$MEGASCALE_PORT MEGASCALE_PORT=$MEGASCALE_PORT \
MEGASCALE_NUM_SLICES=$NUM_SLICES MEGASCALE_SLICE_ID=$1 "
  fi
  echo "cd ~/$REMOTE_DIR && ${env}LOOPJAX_DISTRIBUTED=1 LIBTPU_INIT_ARGS=$flags \
JAX_COMPILATION_CACHE_DIR=$COMPILE_CACHE ~/$VENV/bin/python -m loopjax.cli train \
--config $CONFIG --workdir $WORKDIR${args:+ }${args% }"
}

train() {  # train [detach]: on every worker of every slice, after cleaning up
  local detach="${1:-$DETACH}" i cmd pids=() status=0
  cleanup
  COORDINATOR=""
  if [[ "$NUM_SLICES" -gt 1 ]]; then  # slice 0's worker 0 coordinates the slices
    COORDINATOR="$(query 10.0.0.2 gcloud --project "$PROJECT" compute tpus tpu-vm describe \
      "${NODES[0]}" --zone "$ZONE" --format='value(networkEndpoints[0].ipAddress)')"
  fi
  for i in "${!NODES[@]}"; do
    cmd="$(train_cmd "$i")"
    if [[ "$detach" == 1 ]]; then
      on_node "${NODES[$i]}" "nohup bash -c '$cmd' > ~/$LOG 2>&1 < /dev/null &"
    elif [[ "$DRY_RUN" == 1 || ${#NODES[@]} == 1 ]]; then
      on_node "${NODES[$i]}" "$cmd 2>&1" || status=$?
    else
      on_node "${NODES[$i]}" "$cmd 2>&1" & pids+=($!)
    fi
  done
  for i in "${pids[@]}"; do wait "$i" || status=$?; done
  [[ "$detach" == 1 ]] && echo "started on all workers; follow with: $0 logs" >&2
  return "$status"
}

logs() {  # worker 0 of slice 0 logs the metrics; the others only report problems
  gc compute tpus tpu-vm ssh "${NODES[0]}" --zone "$ZONE" --worker=0 --command "tail -n 50 -F ~/$LOG"
}

stop() {  # SIGTERM: every worker checkpoints at the current step and exits cleanly
  on_all "pkill -TERM -f 'loopjax.cli train' || true"
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" --force --quiet
  else
    gc compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
  fi
}

run() {
  # Train in the foreground; when the queued resource is no longer ACTIVE afterwards (a spot
  # preemption: the workers checkpointed on SIGTERM, or died), delete it, create it again and
  # resume from WORKDIR's newest checkpoint. A failure on ACTIVE capacity is retried too (a
  # worker lost mid-step); MAX_ATTEMPTS bounds both.
  [[ "$QUEUED" == 1 ]] || { echo "run needs QUEUED=1 (it watches the queued resource)" >&2; return 2; }
  local attempt state status
  for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
    echo "attempt $attempt of $MAX_ATTEMPTS" >&2
    state="$(query MISSING gcloud --project "$PROJECT" compute tpus queued-resources describe \
      "$TPU_NAME" --zone "$ZONE" --format='value(state.state)' || echo MISSING)"
    if [[ "$state" != ACTIVE ]]; then
      [[ "$state" != MISSING ]] && delete
      create || continue
      copy; install
    fi
    status=0; train 0 || status=$?
    state="$(qr_state)"
    if [[ "$state" == ACTIVE && "$status" == 0 ]]; then echo "training finished" >&2; return 0; fi
    echo "train exited with status $status; queued resource is $state: retrying" >&2
    [[ "$DRY_RUN" == 1 ]] && return 0
  done
  echo "gave up after $MAX_ATTEMPTS attempts" >&2
  return 1
}

case "$ACTION" in
  create) create ;;
  copy) copy ;;
  install) install ;;
  cleanup) cleanup ;;
  train) train ;;
  run) run ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  status) if [[ "$QUEUED" == 1 ]]; then
            gc compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE"
          else gc compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE"; fi ;;
  ssh) gc compute tpus tpu-vm ssh "${NODES[${SLICE:-0}]}" --zone "$ZONE" --worker="${WORKER:-0}" ;;
  all) create; copy; install; train; [[ "$DETACH" == 1 ]] && logs ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
