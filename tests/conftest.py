"""Test-session defaults: CPU DeepSpeed, one thread per rank, wandb offline into a temp dir."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="argonne-wandb-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
