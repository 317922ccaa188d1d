#!/usr/bin/env bash
# Runs N local processes of one data-parallel job (jax.distributed over gloo on CPU,
# or one process per GPU), with python from the active environment. Usage:
#   NDA_LOCAL_DEVICES=2 launch/local_multiprocess.sh 2 --config=configs/demo.py:tiny --workdir=runs/mp
# CPU: each process gets NDA_LOCAL_DEVICES (default 1) fake devices. The coordinator
# listens on 127.0.0.1:NDA_PORT (default: a random port). SIGTERM is passed on to every
# process (they save and stop at the same step). When one process fails, the others
# are stopped (SIGTERM, then SIGKILL after NDA_PEER_GRACE seconds, default 60), as they
# would otherwise wait for it in a collective.
set -uo pipefail
n="$1"; shift
port="${NDA_PORT:-$((20000 + RANDOM % 20000))}"
pids=()
for ((i = 0; i < n; i++)); do
  NDA_COORDINATOR="127.0.0.1:${port}" NDA_NUM_PROCESSES="$n" NDA_PROCESS_ID="$i" \
  XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=${NDA_LOCAL_DEVICES:-1}}" \
    python -m nda_jax.main "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for ((k = 0; k < n; k++)); do
  wait -n && continue
  status=$?
  if ((rc == 0)); then
    rc=$status
    kill -TERM "${pids[@]}" 2>/dev/null
    (sleep "${NDA_PEER_GRACE:-60}"; kill -KILL "${pids[@]}" 2>/dev/null) &
    killer=$!
  fi
done
wait "${pids[@]}" 2>/dev/null
[[ -n "${killer:-}" ]] && kill "$killer" 2>/dev/null
exit "$rc"
