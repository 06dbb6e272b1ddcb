#!/usr/bin/env bash
# Set up .venv (see launch/setup_env.sh) and run the test suite: ruff, then pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k pipe -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
# shellcheck disable=SC1091
. .venv/bin/activate
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 WANDB_MODE=offline
ruff check .
python -m pytest "$@"
