#!/usr/bin/env bash
# SLURM GPU cluster: one task per GPU; JAX reads the SLURM_* variables itself.
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm.sh train --config=...
#SBATCH --job-name=lmx
#SBATCH --output=lmx-%j-%t.log
set -euo pipefail
srun --kill-on-bad-exit=1 env LMX_DISTRIBUTED_AUTO=1 .venv/bin/lmx "$@"
