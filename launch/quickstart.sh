#!/usr/bin/env bash
# Set up .venv and run the demo: the tiny preset trained on the embedded sample corpus through
# the real data path (plain PyTorch until the training issue lands).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
argonne-ds model-info --preset argonne2 --gpus 8 16
python launch/demo_sample.py "$@"
