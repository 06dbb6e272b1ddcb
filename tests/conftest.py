"""Test-session defaults: CPU DeepSpeed, one thread per rank, wandb offline into a temp dir."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="argonne-wandb-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A training workspace per test module: corpus, model JSON, prepared token cache."""
    from tests.train_helpers import make_workspace

    return make_workspace(tmp_path_factory.mktemp("ws"))
