#!/usr/bin/env bash
# Run one lmx command as N local CPU processes that form one JAX job (jax.distributed, gloo
# collectives over 127.0.0.1): tests multi-host data loading, sharding and checkpointing on
# one machine. See docs/multihost.md.
#   launch/local_multiprocess.sh 2 train --config=experiments/default.py --config.train.steps=20
# Environment (all optional):
#   LMX_PORT      coordinator port (default: a random one in 20000-39999)
#   LMX_LOG_DIR   where lmx_process_<i>.log go (default: the current directory)
#   LMX_BIN       the lmx executable (default: lmx on PATH)
#   LMX_LOCAL_DEVICES  CPU devices per process (default 1)
# Exits with the first failing process's status; the other processes are then stopped
# (a lone survivor would otherwise wait for its peers until the heartbeat timeout).
set -euo pipefail
n="$1"; shift
port="${LMX_PORT:-$((20000 + RANDOM % 20000))}"
logs="${LMX_LOG_DIR:-.}"
mkdir -p "$logs"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  LMX_COORDINATOR="127.0.0.1:${port}" LMX_NUM_PROCESSES="$n" LMX_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${LMX_LOCAL_DEVICES:-1}" \
    "${LMX_BIN:-lmx}" "$@" > "${logs}/lmx_process_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
while ((${#pids[@]})); do
  rc=0
  wait -n -p finished "${pids[@]}" || rc=$?  # bash >= 5.1
  for k in "${!pids[@]}"; do [[ ${pids[k]} == "$finished" ]] && unset 'pids[k]'; done
  if ((rc != 0 && status == 0)); then
    status=$rc
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
tail -n 3 "${logs}"/lmx_process_*.log
exit "$status"
