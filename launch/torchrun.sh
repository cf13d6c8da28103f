#!/usr/bin/env bash
# One node: NPROC processes (default: one per GPU, else 2) running `python -m train` with the given overrides.
#   bash launch/torchrun.sh recipe=debug run_name=exp1
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m train "$@" --print-config > /dev/null
exec torchrun --standalone --nproc_per_node="$NPROC" -m train "$@"
