#!/usr/bin/env bash
# Train loopjax on a Cloud TPU VM slice or pod: every worker runs the same `loopjax train`.
#
#   launch/tpu_pod.sh all     [-- --config.train.steps=1000 ...]   create, copy, install, train
#   launch/tpu_pod.sh create | copy | install | train [-- ...] | logs | stop | delete | ssh | status
#
# Edit the variables below (or set them in the environment). WORKDIR should be a gs:// bucket
# path the TPU VMs can write (Orbax writes checkpoints there from every worker; metrics and
# config.json come from worker 0), so the run survives the VMs being deleted or preempted.
# Re-running `train` with the same WORKDIR resumes from the newest checkpoint.
set -euo pipefail

PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-west4-a}"
TPU_NAME="${TPU_NAME:-loopjax-v5e-32}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-32}"     # v4-32, v5p-64, v6e-16, ...
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"  # tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e
QUEUED="${QUEUED:-1}"              # 1: queued resource (waits for capacity); 0: tpu-vm create
SPOT="${SPOT:-0}"                  # 1: spot/preemptible capacity (resume handles preemption)
CONFIG="${CONFIG:-experiments/sudoku.py}"
WORKDIR="${WORKDIR:-gs://my-bucket/loopjax/${TPU_NAME}}"
REMOTE_DIR="${REMOTE_DIR:-loopjax}"      # relative to the home directory on each worker
PIP_JAX="${PIP_JAX:-jax[tpu]}"           # pin to match your local jax, e.g. jax[tpu]==0.10.2
PYTHON="${PYTHON:-3.11}"                 # uv installs this Python on every worker (images ship 3.10)
VENV="${VENV:-.venv-loopjax}"            # relative to the home directory on each worker
# Overlap of collectives with compute (MaxText's defaults for FSDP/data parallel on TPU).
LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:---xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true --xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true}"
# JAX's persistent compilation cache: a restarted or resumed job skips the compile.
COMPILE_CACHE="${COMPILE_CACHE:-$WORKDIR/jax_cache}"
DETACH="${DETACH:-1}"                    # 1: train under nohup, follow with `logs`; 0: stream
LOG="${LOG:-loopjax_train.log}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ACTION="${1:-all}"
shift || true
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")

gc() { gcloud --project "$PROJECT" "$@"; }
on_all() { gc compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

create() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${spot[@]}"
    echo "waiting for queued resource $TPU_NAME to become ACTIVE ..."
    while true; do
      state="$(gc compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE" \
               --format='value(state.state)')"
      echo "  $(date +%T) $state"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) echo "queued resource is $state" >&2; exit 1 ;;
      esac
      sleep 30
    done
  else
    gc compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${spot[@]}"
  fi
}

copy() {
  # The tracked files plus uncommitted edits, without build outputs or local runs.
  local tarball
  tarball="$(mktemp -t loopjax.XXXXXX).tar.gz"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar czf "$tarball" --null -T -)
  gc compute tpus tpu-vm scp "$tarball" "$TPU_NAME":loopjax.tar.gz --zone "$ZONE" --worker=all
  on_all "mkdir -p ~/$REMOTE_DIR && tar xzf ~/loopjax.tar.gz -C ~/$REMOTE_DIR"
  rm -f "$tarball"
}

install() {
  # The TPU images' system Python is 3.10; jax/flax/orbax/grain need >= 3.11. uv installs a
  # standalone Python and the packages into a venv on every worker.
  on_all "set -e; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
    export PATH=\$HOME/.local/bin:\$PATH; cd ~/$REMOTE_DIR; \
    uv venv --python $PYTHON --allow-existing ~/$VENV; \
    VIRTUAL_ENV=~/$VENV uv pip install '$PIP_JAX' -e '.[tpu,gcs]'; \
    ~/$VENV/bin/python -c 'import jax, loopjax; print(\"jax\", jax.__version__)'"
}

train() {
  # LOOPJAX_DISTRIBUTED=1: gcloud-created TPU VMs have no environment variable that tells
  # JAX it is one of several workers; this makes every worker call jax.distributed.initialize.
  local args cmd flags
  args="$(printf '%q ' "${EXTRA[@]}")"
  flags="$(printf '%q' "$LIBTPU_INIT_ARGS")"  # escaped, no quotes: survives `bash -c '...'`
  cmd="cd ~/$REMOTE_DIR && LOOPJAX_DISTRIBUTED=1 LIBTPU_INIT_ARGS=$flags \
    JAX_COMPILATION_CACHE_DIR=$COMPILE_CACHE ~/$VENV/bin/python -m loopjax.cli train \
    --config $CONFIG --workdir $WORKDIR $args"
  if [[ "$DETACH" == 1 ]]; then
    on_all "nohup bash -c '$cmd' > ~/$LOG 2>&1 < /dev/null &"
    echo "started on all workers; follow with: $0 logs"
  else
    on_all "$cmd 2>&1"
  fi
}

logs() {  # worker 0 logs the metrics; the others only report problems
  gc compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command "tail -n 50 -F ~/$LOG"
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

case "$ACTION" in
  create) create ;;
  copy) copy ;;
  install) install ;;
  train) train ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  status) if [[ "$QUEUED" == 1 ]]; then
            gc compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE"
          else gc compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE"; fi ;;
  ssh) gc compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="${WORKER:-0}" ;;
  all) create; copy; install; train; [[ "$DETACH" == 1 ]] && logs ;;
  *) sed -n '2,11p' "$0" >&2; exit 2 ;;
esac
