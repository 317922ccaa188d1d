#!/usr/bin/env bash
# Runs N local processes of one data-parallel job (jax.distributed over gloo on CPU,
# or one process per GPU). Usage:
#   launch/local_multiprocess.sh 2 --config=configs/demo.py --workdir=runs/mp
# CPU: each process gets NDA_LOCAL_DEVICES (default 1) fake devices.
set -euo pipefail
n="$1"; shift
port="${NDA_PORT:-$((20000 + RANDOM % 20000))}"
pids=()
for ((i = 0; i < n; i++)); do
  NDA_COORDINATOR="127.0.0.1:${port}" NDA_NUM_PROCESSES="$n" NDA_PROCESS_ID="$i" \
  XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=${NDA_LOCAL_DEVICES:-1}}" \
    python -m nda_jax.main "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
