#!/usr/bin/env bash
# Start the same lmx command on every worker of a Cloud TPU pod slice. JAX discovers the
# coordinator and process index from the TPU metadata (LMX_DISTRIBUTED_AUTO=1).
#   launch/tpu_pod.sh my-tpu us-central2-b train --config=experiments/llama.py:1b --config.mesh.fsdp=-1
set -euo pipefail
tpu="$1"; zone="$2"; shift 2
# Quote the arguments once so they survive the remote shell.
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/lmx && LMX_DISTRIBUTED_AUTO=1 .venv/bin/lmx ${args}"
