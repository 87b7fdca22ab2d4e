#!/bin/bash
# SLURM array job: one IsoFLOP run per array task.
#   lmx sweep plan --config=experiments/isoflop.py        # writes SWEEP_DIR/plan/*.json
#   lmx sweep run --sweep_dir=SWEEP_DIR --emit=slurm      # prints the sbatch line below
#   sbatch --array=0-$((N-1)) launch/sweep_slurm.sh SWEEP_DIR
# Afterwards `lmx sweep run --sweep_dir=SWEEP_DIR` (locally) skips finished runs and fits.
#SBATCH --job-name=lmx-sweep
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
set -euo pipefail
SWEEP_DIR=${1:?usage: sbatch --array=0-N launch/sweep_slurm.sh SWEEP_DIR}
exec lmx sweep run --sweep_dir="$SWEEP_DIR" --index="${SLURM_ARRAY_TASK_ID:?not an array job}" --no_fit
