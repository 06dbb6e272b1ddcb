"""The DeepSpeed JSON: read it, tell its mode, and apply the run config to it. No DeepSpeed import.

The JSON alone picks the mode:
    "pipeline": {"stages": N, ...}     -> the model as a PipelineModule, `train_batch` (1F1B)
    "zero_optimization": {"stage": 3}  -> the plain model built under `deepspeed.zero.Init`
    anything else                      -> the plain model, data parallel (ZeRO 0/1/2)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from argonne_ds.run_config import ConfigError, RunConfig

__all__ = ["ConfigError", "engine_mode", "read_ds_config", "resolve_ds_config"]


def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist; see ds_configs/ for examples")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e


def engine_mode(ds_config: dict[str, Any]) -> str:
    pipe = ds_config.get("pipeline") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if "stages" in pipe:
        if stage >= 2:
            raise ConfigError(f"pipeline parallelism works with ZeRO stage 0 or 1, not {stage}; "
                              "use ds_configs/pipeline.json or a ZeRO-3 config without "
                              "'pipeline'")
        return "pipeline"
    return "zero3" if stage == 3 else "data_parallel"


def resolve_ds_config(run: RunConfig, world_size: int) -> tuple[dict[str, Any], int, list[str]]:
    """The JSON with the run config applied; returns (config, max_steps, override notes)."""
    cfg = run.train
    ds = read_ds_config(cfg.deepspeed_config)
    notes: list[str] = []

    def override(path: list[str], value: Any, flag: str) -> None:
        node = ds
        for key in path[:-1]:
            node = node.setdefault(key, {})
        old = node.get(path[-1])
        if old != value:
            notes.append(f"{flag} {value} overrides {'.'.join(path)}={old}")
        node[path[-1]] = value

    if cfg.batch_size:
        override(["train_micro_batch_size_per_gpu"], cfg.batch_size, "--batch-size")
    if cfg.gradient_accumulation_steps:
        override(["gradient_accumulation_steps"], cfg.gradient_accumulation_steps,
                 "--gradient-accumulation-steps")
    stages = int((ds.get("pipeline") or {}).get("stages", 1))
    if world_size % stages:
        raise ConfigError(f"{world_size} processes cannot form {stages} pipeline stages")
    total = ds.pop("train_batch_size", None)  # derived: micro x accumulation x data parallel
    if total and "train_micro_batch_size_per_gpu" not in ds:
        ds["train_micro_batch_size_per_gpu"] = max(
            1, total // (ds.get("gradient_accumulation_steps", 1) * (world_size // stages)))
    global_batch = (ds.get("train_micro_batch_size_per_gpu", 1)
                    * ds.get("gradient_accumulation_steps", 1) * (world_size // stages))
    if cfg.max_steps is None and cfg.max_tokens is None:
        raise ConfigError("give --max-steps or --max-tokens")
    max_steps = cfg.max_steps or math.ceil(cfg.max_tokens / (global_batch * run.data.block_size))
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    override(["optimizer", "params", "lr"], cfg.learning_rate, "--learning-rate")
    opt["weight_decay"] = cfg.weight_decay  # applied per group (none on norms, embeddings)
    ratio = cfg.min_learning_rate / cfg.learning_rate
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
        **(ds.get("scheduler") or {}).get("params", {}),
        "total_num_steps": max_steps, "warmup_num_steps": max(1, cfg.warmup_steps),
        "warmup_type": "linear", "warmup_min_ratio": ratio, "cos_min_ratio": ratio}}
    if cfg.precision:
        for kind in ("bf16", "fp16"):
            want = cfg.precision == kind
            if want != bool((ds.get(kind) or {}).get("enabled", False)):
                notes.append(f"--{cfg.precision} {'enables' if want else 'disables'} {kind} "
                             "(the JSON said otherwise)")
            ds.setdefault(kind, {})["enabled"] = want
    return ds, max_steps, notes
