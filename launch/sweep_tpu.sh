#!/bin/bash
# Run an IsoFLOP sweep's job list on a TPU VM, one run after another (each run uses every
# local chip). Jobs come from `lmx sweep run --sweep_dir=SWEEP_DIR --emit=tpu`
# (SWEEP_DIR/jobs.txt); finished runs are skipped, so re-running after preemption resumes.
#   bash launch/sweep_tpu.sh SWEEP_DIR
set -euo pipefail
SWEEP_DIR=${1:?usage: bash launch/sweep_tpu.sh SWEEP_DIR}
while read -r cmd; do
  echo "+ $cmd --no_fit"
  $cmd --no_fit
done < "$SWEEP_DIR/jobs.txt"
lmx sweep run --sweep_dir="$SWEEP_DIR"  # nothing left to train: writes the fits
