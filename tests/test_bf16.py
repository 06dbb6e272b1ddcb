"""bf16 done right: gradients accumulate in fp32 (enforced when a bf16 JSON does not say so), and
a bf16 run tracks the fp32 run of the same model, data and seed, in pipeline (DeepSpeed's
BF16_Optimizer) and ZeRO-3 alike (2 gloo ranks, CPU bf16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from argonne_ds.config import ArgonneConfig
from argonne_ds.engine.ds_config import resolve_ds_config
from argonne_ds.run_config import DataConfig, RunConfig, TrainConfig
from argonne_ds.testing import run_distributed_test
from tests.test_scale_out import CONFIG, _rank_batches, ds_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
# Measured on this CPU (2 ranks, 8 steps, tests/test_scale_out.py's model, losses ~6.93): the
# largest |bf16 - fp32| loss difference was 1.45e-3 (pipeline) and 1.35e-3 (ZeRO-3), growing
# from 3e-5 at step 1; the test allows ~4x that.
TOLERANCE = 6e-3


@pytest.mark.parametrize("name", ["cpu_pipeline.json", "cpu_zero3.json"])
def test_bf16_accumulates_in_fp32_unless_the_json_says_otherwise(name: str) -> None:
    def run(precision: str) -> RunConfig:
        return RunConfig(DataConfig(["x"]), TrainConfig(
            deepspeed_config=str(ROOT / "ds_configs" / name), max_steps=10, precision=precision))

    ds, _, notes = resolve_ds_config(run("bf16"), world_size=2)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert any("gradients accumulate in fp32" in n for n in notes)
    assert "data_types" not in resolve_ds_config(run("fp32"), world_size=2)[0]


def _losses(rank: int, world: int, stages: int, zero: int, bf16: bool) -> dict:
    from argonne_ds.engine.engine import Engine

    cfg = ds_config(world, stages, zero)
    if bf16:
        cfg.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    engine = Engine(ArgonneConfig(**CONFIG), cfg, seed=7)
    data = _rank_batches(engine.dp_rank, engine.dp_world, STEPS)
    return {"losses": [engine.train_step(data).loss for _ in range(STEPS)],
            "optimizer": type(engine.engine.optimizer).__name__}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("stages", "zero"), [(2, 1), (0, 3)], ids=["pipeline", "zero3"])
def test_bf16_tracks_fp32(stages: int, zero: int) -> None:
    fp32 = run_distributed_test(_losses, 2, args=(stages, zero, False), timeout_s=240)[0]
    bf16 = run_distributed_test(_losses, 2, args=(stages, zero, True), timeout_s=240)[0]
    if stages:
        assert bf16["optimizer"] == "BF16_Optimizer"  # fp32 accumulation and master weights
    diff = max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"]))
    print(f"bf16 vs fp32, {'pipeline' if stages else 'zero3'}: max |loss diff| {diff:.2e}; "
          f"fp32 {fp32['losses']}, bf16 {bf16['losses']}")
    assert 0 < diff < TOLERANCE
