#!/usr/bin/env bash
# N cooperating CPU processes on this machine, K fake devices each: a multi-host rehearsal.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh \
#       loopjax train --config experiments/sudoku.py --workdir /tmp/run
#
# Appends --coordinator localhost:PORT --num-processes N --process-id i to the command for each
# process; logs go to stdout prefixed with [i]. Ctrl-C stops all of them. (The tests use the
# Python twin, launch/local_multiprocess.py, which also stops the others when one fails.)
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
# A free port below the ephemeral range (see free_port in the Python twin): process 0 binds it
# only after importing JAX, and an ephemeral one may meanwhile go to an outgoing connection.
PORT="${PORT:-$(cd "$(dirname "$0")" && python3 -c 'from local_multiprocess import free_port; print(free_port())')}"

if [[ $# -eq 0 ]]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
if [[ "$1" == "loopjax" ]]; then
  shift
  set -- python3 -m loopjax.cli "$@"
fi

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  "$@" --coordinator "localhost:${PORT}" --num-processes "${NUM_PROCESSES}" --process-id "$i" \
    > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
