"""The DeepSpeed JSON: read it, tell its mode, and apply the run config to it. No DeepSpeed import.

The JSON alone picks the mode:
    "pipeline": {"stages": N, ...}     -> the model as a PipelineModule, `train_batch` (1F1B)
    "zero_optimization": {"stage": 3}  -> the plain model built under `deepspeed.zero.Init`
    anything else                      -> the plain model, data parallel (ZeRO 0/1/2)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from argonne_ds.run_config import ConfigError, RunConfig

__all__ = ["ConfigError", "engine_mode", "pipeline_stages", "read_ds_config",
           "resolve_ds_config"]


def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist; see ds_configs/ for examples")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e


def pipeline_stages(ds_config: dict[str, Any]) -> int:
    """Pipeline stages the JSON asks for (1: no pipeline)."""
    return int((ds_config.get("pipeline") or {}).get("stages", 1))


COMPILE_KEY = "torch_compile"
COMPILE_FIELDS = {"enabled": bool, "backend": str, "mode": (str, type(None)),
                  "dynamic": (bool, type(None)), "fullgraph": bool}


def compile_options(ds_config: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON's "torch_compile" section (ours: DeepSpeed's own "compile" section configures
    DeepCompile and refuses other keys) as torch.compile's arguments, or None when off:
    {"enabled": true, "backend": "inductor", "mode": null, "dynamic": null, "fullgraph": false}.
    """
    section = ds_config.get(COMPILE_KEY)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f'"{COMPILE_KEY}" must be an object like {{"enabled": true}}, got '
                          f"{section!r}")
    for key, value in section.items():
        if key not in COMPILE_FIELDS:
            raise ConfigError(f'"{COMPILE_KEY}.{key}" is not a setting; use '
                              f"{', '.join(COMPILE_FIELDS)}")
        if not isinstance(value, COMPILE_FIELDS[key]):
            raise ConfigError(f'"{COMPILE_KEY}.{key}" = {value!r} has the wrong type')
    if not section.get("enabled", True):
        return None
    return {"backend": section.get("backend", "inductor"), "mode": section.get("mode"),
            "dynamic": section.get("dynamic"), "fullgraph": section.get("fullgraph", False)}


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


def _batch_shape(ds: dict[str, Any], cfg: Any, dp: int, micro_cap: int | None = None,
                 origin: Callable[[str], str] = lambda name: "run config",
                 phase_batch: int | None = None) -> tuple[int, list[str]]:
    """Fix micro-batch, accumulation and global batch in `ds` for `dp` data-parallel ranks. The
    global batch is the invariant (--global-batch-size, else the JSON's train_batch_size, else
    its micro x accumulation x dp); accumulation is derived from it, unless given explicitly.
    `micro_cap`: the micro-batch an out-of-memory backoff left (accumulation grows instead);
    `phase_batch`: the global batch of a phase that changes it (phases.py), which wins."""
    json_micro = ds.get("train_micro_batch_size_per_gpu")
    json_accum = ds.get("gradient_accumulation_steps")
    json_total = ds.pop("train_batch_size", None)
    micro = cfg.batch_size or json_micro or max(1, (json_total or 1) // ((json_accum or 1) * dp))
    if phase_batch:
        total = phase_batch
    elif cfg.gradient_accumulation_steps:
        total = micro * cfg.gradient_accumulation_steps * dp
        if cfg.global_batch_size and cfg.global_batch_size != total:
            raise ConfigError(f"--global-batch-size {cfg.global_batch_size} disagrees with "
                              f"--batch-size {micro} x --gradient-accumulation-steps "
                              f"{cfg.gradient_accumulation_steps} x {dp} data-parallel ranks = "
                              f"{total}; give one of them")
    else:
        total = cfg.global_batch_size or json_total or micro * (json_accum or 1) * dp
    notes, capped = [], bool(micro_cap and micro > micro_cap)
    if capped:
        notes.append(f"micro-batch {micro_cap}, not {micro}: a launch of this run ran out of "
                     "memory (see oom_backoff.json in the output directory; delete it to try "
                     f"{micro} again)")
        micro = micro_cap
    accum, rem = divmod(total, micro * dp)
    if rem or accum < 1:
        raise ConfigError(f"a global batch of {total} samples cannot be split into micro-batches "
                          f"of {micro} on {dp} data-parallel ranks; choose a global batch that "
                          f"is a multiple of {micro * dp} (--global-batch-size) or another "
                          "--batch-size")
    if micro != json_micro and not capped:
        notes.append(f"batch_size {micro} ({origin('batch_size')}) overrides "
                     f"train_micro_batch_size_per_gpu={json_micro}")
    if accum != json_accum:
        how = ("--gradient-accumulation-steps" if cfg.gradient_accumulation_steps
               else "the global batch")
        was = "" if json_accum is None else f", the JSON said {json_accum}"
        notes.append(f"gradient accumulation {accum} (from {how}{was}): global batch {total} = "
                     f"micro-batch {micro} x {accum} x {dp} data-parallel ranks")
    ds.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=accum)
    return total, notes


def resolve_ds_config(run: RunConfig, world_size: int, micro_cap: int | None = None,
                      phase_batch: int | None = None) -> tuple[dict[str, Any], int, list[str]]:
    """The JSON with the run config applied for `world_size` ranks (`micro_cap`: the micro-batch
    an out-of-memory backoff left); returns (config, max_steps, notes on what differs from the
    JSON)."""
    cfg = run.train
    ds = read_ds_config(cfg.deepspeed_config)
    notes: list[str] = []

    def override(path: list[str], value: Any, name: str) -> None:
        node = ds
        for key in path[:-1]:
            node = node.setdefault(key, {})
        old = node.get(path[-1])
        if old != value:
            notes.append(f"{name} {value} ({run.origin(name)}) overrides "
                         f"{'.'.join(path)}={old}")
        node[path[-1]] = value

    compile_options(ds)  # a bad section fails here, before any rank starts the engine
    stages = pipeline_stages(ds)
    if world_size % stages:
        raise ConfigError(f"{world_size} processes cannot form {stages} pipeline stages")
    if cfg.sequence_parallel_size:
        override(["sequence_parallel_size"], cfg.sequence_parallel_size,
                 "sequence_parallel_size")
    sp = int(ds.get("sequence_parallel_size", 1) or 1)  # a group of sp ranks shares samples
    if world_size % (stages * sp):
        raise ConfigError(f"{world_size} processes cannot form {stages} pipeline stages x "
                          f"sequence_parallel_size {sp}")
    global_batch, batch_notes = _batch_shape(ds, cfg, world_size // stages // sp, micro_cap,
                                             run.origin, phase_batch)
    notes += batch_notes
    if cfg.max_steps is None and cfg.max_tokens is None:
        raise ConfigError("give --max-steps or --max-tokens")
    max_steps = cfg.max_steps or math.ceil(cfg.max_tokens / (global_batch * run.data.block_size))
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    override(["optimizer", "params", "lr"], cfg.learning_rate, "learning_rate")
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
    if (ds.get("bf16") or {}).get("enabled"):
        # Summed in bf16 (DeepSpeed's default for a bf16 model), gradients keep 8 bits of
        # mantissa: over tens of micro-batches the small contributions vanish.
        types = ds.setdefault("data_types", {})
        if "grad_accum_dtype" not in types:
            types["grad_accum_dtype"] = "fp32"
            notes.append("bf16: gradients accumulate in fp32 (data_types.grad_accum_dtype; "
                         "bf16 sums lose the small contributions over many micro-batches)")
        elif types["grad_accum_dtype"] != "fp32":
            notes.append(f"bf16 with data_types.grad_accum_dtype={types['grad_accum_dtype']} as "
                         "the JSON asks: gradient sums lose precision over many micro-batches")
    return ds, max_steps, notes
