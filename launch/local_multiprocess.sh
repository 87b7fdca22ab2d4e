#!/usr/bin/env bash
# Run one lmx command as N local processes (CPU: each process gets its own devices and
# they talk through gloo), e.g. to test multi-host data loading and sharding on a laptop:
#   launch/local_multiprocess.sh 2 train --config=experiments/default.py --config.train.steps=20
set -euo pipefail
n="$1"; shift
port="${LMX_PORT:-$((20000 + RANDOM % 20000))}"
pids=()
for ((i = 0; i < n; i++)); do
  LMX_COORDINATOR="127.0.0.1:${port}" LMX_NUM_PROCESSES="$n" LMX_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu lmx "$@" > "lmx_process_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
tail -n 5 lmx_process_*.log
exit "$status"
