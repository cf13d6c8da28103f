#!/usr/bin/env bash
# From a fresh machine (Python 3.11 + pip) to a finished debug curriculum: creates .venv, installs torch (CPU) and
# the project, generates the demo corpus (python -m data.synthetic, once: a run never generates data), and trains
# every stage of the Kimi-VL curriculum on a tiny model with 2 data-parallel processes (torchrun, gloo). Extra
# arguments are recipe overrides, e.g. run_name=try2.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e .

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Validate the recipe before any process starts: a bad key fails here with what to change.
python -m train recipe=debug "$@" --print-config > /dev/null
[ -f demo_data/manifest.json ] || python -m data.synthetic --out demo_data
torchrun --standalone --nproc_per_node="$NPROC" -m train recipe=debug "$@"
