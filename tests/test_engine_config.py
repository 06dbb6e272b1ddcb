"""Shipped DeepSpeed JSONs, mode detection, CLI overrides, the LR curve, weight-decay groups, and
checkpoint bookkeeping (no processes spawned here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from argonne_ds.checkpoint import store as ckpt
from argonne_ds.config import ArgonneConfig
from argonne_ds.engine.ds_config import ConfigError, engine_mode, read_ds_config, resolve_ds_config
from argonne_ds.engine.engine import param_groups, start_scheduler
from argonne_ds.model import ArgonneModel
from argonne_ds.reliability import is_oom
from argonne_ds.run_config import DataConfig, RunConfig, TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))
EXPECTED_MODE = {"pipeline.json": "pipeline", "cpu_pipeline.json": "pipeline",
                 "zero3.json": "zero3", "zero3_offload.json": "zero3", "cpu_zero3.json": "zero3"}


def test_every_shipped_config_is_listed() -> None:
    assert {p.name for p in CONFIGS} == set(EXPECTED_MODE)


class _OneRank:
    """The smallest `mpu` DeepSpeedConfig accepts without a process group."""

    def get_data_parallel_world_size(self) -> int:
        return 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path: Path) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = read_ds_config(path)
    assert engine_mode(ds) == EXPECTED_MODE[path.name]
    cfg = RunConfig(DataConfig(["x"], block_size=64),
                    TrainConfig(deepspeed_config=str(path), max_steps=100, warmup_steps=10))
    stages = int((ds.get("pipeline") or {}).get("stages", 1))
    resolved, max_steps, _ = resolve_ds_config(cfg, world_size=stages)
    checked = DeepSpeedConfig(resolved, mpu=_OneRank())  # DeepSpeed's own parser and checks
    assert checked.train_micro_batch_size_per_gpu == ds["train_micro_batch_size_per_gpu"]
    assert resolved["scheduler"]["type"] == "WarmupCosineLR" and max_steps == 100
    if ds.get("bf16", {}).get("enabled"):  # shipped explicitly, not only enforced
        assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["train_batch_size"] == resolved["train_batch_size"]  # the invariant, as written
    if path.name.startswith("cpu_"):
        assert not resolved.get("bf16", {}).get("enabled")
        assert resolved["optimizer"]["params"]["torch_adam"] is True
    elif EXPECTED_MODE[path.name] == "pipeline":  # pipeline + bf16 needs ZeRO-1 to reload
        assert resolved["bf16"]["enabled"] and resolved["zero_optimization"]["stage"] == 1
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer")
    if not path.name.startswith("cpu_") and not offload:
        # No op JIT-built on a GPU node (DeepSpeed's FusedAdam needs nvcc there): torch's own
        # fused AdamW, which DeepSpeed builds from the remaining params.
        params = dict(resolved["optimizer"]["params"])
        assert params.pop("torch_adam") is True and params["fused"] is True
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **params).step()


def test_bad_configs_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_ds_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="ZeRO stage 0 or 1"):
        engine_mode({"pipeline": {"stages": 2}, "zero_optimization": {"stage": 3}})
    assert engine_mode({"zero_optimization": {"stage": 2}}) == "data_parallel"


def test_cli_overrides_win_and_are_reported(tmp_path: Path) -> None:
    path = CONFIGS[0].parent / "cpu_zero3.json"
    cfg = RunConfig(DataConfig(["x"], block_size=128), TrainConfig(
        deepspeed_config=str(path), batch_size=2, gradient_accumulation_steps=3,
        learning_rate=1e-3, min_learning_rate=1e-4, max_tokens=10_000, precision="bf16"))
    ds, max_steps, notes = resolve_ds_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["bf16"]["enabled"]
    assert max_steps == math.ceil(10_000 / (2 * 3 * 2 * 128))  # the token budget
    assert any("batch_size 2 (run config) overrides train_micro_batch_size_per_gpu=4" in n
               for n in notes)
    assert ds["scheduler"]["params"]["cos_min_ratio"] == pytest.approx(0.1)


def test_lr_curve_is_linear_warmup_from_min_then_cosine_to_min() -> None:
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    path = CONFIGS[0].parent / "cpu_pipeline.json"
    cfg = RunConfig(DataConfig(["x"]), TrainConfig(
        deepspeed_config=str(path), max_steps=1000, warmup_steps=100, learning_rate=3e-4,
        min_learning_rate=3e-5))
    ds, _, _ = resolve_ds_config(cfg, world_size=2)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = WarmupCosineLR(opt, **ds["scheduler"]["params"])
    start_scheduler(sched)  # what Engine does
    lrs = []
    for _ in range(1200):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(3e-5)  # starts at the minimum, not at zero
    assert lrs[50] == pytest.approx(3e-5 + (3e-4 - 3e-5) * 0.5)  # linear half-way
    assert max(lrs) == pytest.approx(3e-4, rel=1e-4) and abs(lrs.index(max(lrs)) - 100) <= 1
    assert lrs[550] == pytest.approx((3e-4 + 3e-5) / 2, rel=1e-2)  # cosine mid-point
    assert all(a >= b for a, b in zip(lrs[101:1000], lrs[102:1001]))  # decays monotonically
    assert lrs[999] == pytest.approx(3e-5, rel=1e-3) and lrs[1199] == pytest.approx(3e-5)


def test_no_weight_decay_on_norms_and_embeddings() -> None:
    model = ArgonneModel(ArgonneConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=None, max_position_embeddings=16))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        "embed_tokens.weight", "norm.weight", *(f"blocks.{i}.{n}.weight" for i in range(2)
                                                for n in ("input_norm", "post_norm"))}
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}


def test_oom_detection_walks_the_cause_chain() -> None:
    class BackendCompilerFailed(RuntimeError):  # what torch.compile/Dynamo wraps errors in
        pass

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as inner:
            raise BackendCompilerFailed("backend='inductor' raised") from inner
    except BackendCompilerFailed as e:
        assert is_oom(e)
    assert not is_oom(ValueError("shape mismatch"))


def test_an_oom_backoff_caps_the_micro_batch_and_keeps_the_global_batch() -> None:
    zero3 = next(c for c in CONFIGS if c.name == "cpu_zero3.json")
    cfg = RunConfig(train=TrainConfig(deepspeed_config=str(zero3), max_steps=10))
    ds, _, _ = resolve_ds_config(cfg, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 2)
    ds, _, notes = resolve_ds_config(cfg, world_size=2, micro_cap=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 4)
    assert ds["train_batch_size"] == 16
    assert any("micro-batch 2, not 4: a launch of this run ran out of memory" in n for n in notes)
    ds, _, _ = resolve_ds_config(cfg, world_size=2, micro_cap=8)  # a cap above: no change
    assert ds["train_micro_batch_size_per_gpu"] == 4


def _fake_checkpoint(root: Path, step: int, complete: bool) -> None:
    (root / ckpt.tag_for(step)).mkdir(parents=True)
    if complete:
        ckpt.write_marker(root, ckpt.tag_for(step), {"step": step})


def test_resume_candidates_and_rotation(tmp_path: Path) -> None:
    for step, complete in ((2, True), (4, True), (6, False), (8, True), (10, False)):
        _fake_checkpoint(tmp_path, step, complete)
    (tmp_path / "not_a_checkpoint").mkdir()
    assert ckpt.resume_candidates(tmp_path) == ["global_step8", "global_step4", "global_step2"]
    dropped = ckpt.rotate(tmp_path, keep=2)
    assert sorted(dropped) == ["global_step2", "global_step6"]  # old, and a stale partial
    complete, incomplete = ckpt.list_tags(tmp_path)
    assert complete == ["global_step4", "global_step8"] and incomplete == ["global_step10"]
    marker = json.loads((tmp_path / "global_step8" / ckpt.MARKER).read_text())
    assert marker["step"] == 8 and marker["tag"] == "global_step8"
    assert ckpt.split_checkpoint_path(tmp_path / "global_step4") == (tmp_path, "global_step4")
    assert ckpt.split_checkpoint_path(tmp_path) == (tmp_path, None)


def test_the_global_batch_is_the_invariant() -> None:
    """The JSON's train_batch_size decides; accumulation is derived for the layout at hand, so
    swapping pipeline <-> ZeRO-3 on the same ranks keeps the global batch."""
    root = CONFIGS[0].parent

    def shape(ds_name: str, world: int, **train) -> tuple[int, int, int]:
        cfg = RunConfig(DataConfig(["x"]), TrainConfig(
            deepspeed_config=str(root / ds_name), max_steps=10, **train))
        ds, _, _ = resolve_ds_config(cfg, world_size=world)
        return (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
                ds["gradient_accumulation_steps"])

    assert shape("cpu_pipeline.json", 2) == (16, 4, 4)  # 2 stages: 1 data-parallel rank
    assert shape("cpu_zero3.json", 2) == (16, 4, 2)  # 2 data-parallel ranks
    assert shape("cpu_zero3.json", 4) == (16, 4, 1)
    assert shape("zero3.json", 8) == shape("zero3.json", 8, global_batch_size=256)
    assert shape("pipeline.json", 8, batch_size=2) == (256, 2, 64)  # 4 stages x 2 replicas
    assert shape("cpu_zero3.json", 2, global_batch_size=8, batch_size=2) == (8, 2, 2)
    # Accumulation given explicitly decides instead (the global batch follows the ranks).
    assert shape("cpu_zero3.json", 2, gradient_accumulation_steps=3) == (24, 4, 3)
    with pytest.raises(ConfigError, match="disagrees"):
        shape("cpu_zero3.json", 2, gradient_accumulation_steps=3, global_batch_size=16)
    with pytest.raises(ConfigError, match="cannot be split into micro-batches of 4 on 2"):
        shape("cpu_zero3.json", 2, global_batch_size=12)
