"""Engines built from the JSON start from the model's own init (normal 0.02, residual projections
scaled down, norms at 1), also under ZeRO-3 where HF's post_init only sees empty partitions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from argonne_ds.testing import run_distributed_test

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=256, hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=256,
             max_position_embeddings=32)


def _init_stats(rank: int, world: int, config_name: str) -> dict:
    import deepspeed
    import torch

    from argonne_ds.config import ArgonneConfig
    from argonne_ds.engine.engine import Engine

    ds = json.loads((ROOT / "ds_configs" / config_name).read_text())
    engine = Engine(ArgonneConfig(**MODEL), ds)
    stats: dict = {"mode": engine.mode}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full = p.detach().float().clone()
        if full.numel() == 0:
            continue
        kind = ("residual" if ("o_proj" in name or "down_proj" in name) else
                "norm" if full.dim() == 1 else "matrix")
        stats.setdefault(kind, []).append(float(full.std()) if kind != "norm" else
                                          bool(torch.all(full == 1)))
    return stats


@pytest.mark.distributed
@pytest.mark.parametrize("config_name", ["cpu_zero3.json", "cpu_pipeline.json"])
def test_engine_parameters_follow_the_model_init(config_name: str) -> None:
    results = run_distributed_test(_init_stats, world_size=2, args=(config_name,), timeout_s=180)
    scaled = 0.02 / math.sqrt(2 * MODEL["num_hidden_layers"])
    for r in results:
        assert r["mode"] == {"cpu_zero3.json": "zero3", "cpu_pipeline.json": "pipeline"}[
            config_name]
        assert all(s == pytest.approx(0.02, rel=0.1) for s in r["matrix"]), r["matrix"]
        assert r["residual"] and all(s == pytest.approx(scaled, rel=0.1) for s in r["residual"])
        assert all(r["norm"])


def _count_inits(rank: int, world: int) -> list[int]:
    from argonne_ds.config import ArgonneConfig
    from argonne_ds.engine import engine as engine_module

    calls: list[int] = []
    real = engine_module.init_weights_by_name

    def counted(*args: object, **kwargs: object) -> None:
        calls.append(1)
        real(*args, **kwargs)

    engine_module.init_weights_by_name = counted
    ds = {"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    counts = []
    for init in (False, True):
        calls.clear()
        engine_module.Engine(ArgonneConfig(**MODEL), ds, init_weights=init)
        counts.append(len(calls))
    return counts


@pytest.mark.distributed
def test_resuming_skips_the_seed_initialisation() -> None:
    """A job that will resume a checkpoint (which overwrites every weight) does not draw the
    initial weights by name: tens of seconds per data-parallel rank for argonne2."""
    assert run_distributed_test(_count_inits, world_size=1, timeout_s=120) == [[0, 1]]
