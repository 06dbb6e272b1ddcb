#!/usr/bin/env bash
# Create .venv in the repository (if missing) and install argonne-ds with its dev extras.
# Idempotent: a second run only re-checks. Source it or run it.
#   TORCH_SPEC   the torch to install when none is present (default torch==2.13.0; on a GPU
#                cluster install your CUDA build of torch into .venv first, or set this)
#   PYTHON       the interpreter that creates the venv (default python3, >= 3.10)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! python -c "import argonne_ds, deepspeed, gigatoken, pytest, ruff, wandb" 2>/dev/null; then
    echo "[setup] installing argonne-ds[dev] (DeepSpeed without prebuilt ops)"
    DS_BUILD_OPS=0 python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
    python -c "import argonne_ds, deepspeed" # fail loudly if the install did not work
fi
echo "[setup] ready: $(python -c 'import torch, deepspeed, transformers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")')"
