"""Weights and optimizer state into and out of an engine, beside DeepSpeed's own checkpoints:
the initial weights (from the seed by name, or a plain state dict such as an imported HF
folder), a layout-free bundle (checkpoint/reshard.py) set into any layout with its Adam moments,
and the full fp32 weights of a ZeRO-3 checkpoint read offline."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from argonne_ds.engine.ds_config import ConfigError
from argonne_ds.model.model import init_by_name, initial_value
from argonne_ds.model.pipe import load_plain_state_into_pipe, pipe_to_plain_key

# `engine` below is an engine.Engine (typed Any: engine.py imports this module).
Engine = Any


def adam_step_value(optimizer: Any, old: Any, step: int) -> Any:
    """Adam's step count in the form this optimizer keeps it: torch's Adam/AdamW a float32
    tensor (on the device when fused or capturable), DeepSpeed's FusedAdam (GPU) and CPU Adam a
    Python int, which they pass to their kernels (a wrong form, or a step of 0, would restart
    the bias correction)."""
    if torch.is_tensor(old):
        return torch.full_like(old, float(step))
    if old is not None:
        return int(step)
    if type(optimizer).__module__.startswith("torch.optim"):
        device = next((p.device for g in optimizer.param_groups for p in g["params"]
                       if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")),
                      torch.device("cpu"))
        return torch.tensor(float(step), dtype=torch.float32, device=device)
    return int(step)


def zero3_fp32_state(directory: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a ZeRO-3 checkpoint of any rank count, offline (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for results
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag))


def plain_name(engine: Engine, name: str) -> str:
    if engine.mode == "pipeline":
        return pipe_to_plain_key(name, engine.model_config.num_hidden_layers)
    return name



def load_plain_state(engine: Engine, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    if engine.mode == "pipeline":
        load_plain_state_into_pipe(model, state, engine.model_config.num_hidden_layers)
        return
    missing = set(dict(model.named_parameters())) - set(state)
    if missing:
        raise ConfigError(f"the initial weights lack {sorted(missing)[:4]}")
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if engine.mode != "zero3" or dist.get_rank() == 0:
                with torch.no_grad():
                    p.copy_(state[name].to(p.dtype))


def init_weights_by_name(engine: Engine, model: nn.Module, seed: int) -> None:
    """Every parameter from (seed, its plain name) alone: the same model in every layout.
    Under zero.Init the partitions are gathered per module (rank 0 writes, the others
    receive); elsewhere each rank sets the parameters it holds."""
    if engine.mode != "zero3":
        init_by_name(model, engine.model_config, seed, lambda n: plain_name(engine, n))
        return
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0), \
                torch.no_grad():
            if dist.get_rank() == 0:
                for local, p in own:
                    name = f"{prefix}.{local}" if prefix else local
                    p.copy_(initial_value(module, name, p.shape, engine.model_config, seed))


def load_portable(engine: Engine, bundle: Any, fallback_step: int) -> int:
    """Set every parameter this rank holds, fp32 master and Adam moments, from a layout-free
    `bundle` (reshard.Bundle: plain names -> full tensors), then the working weights the
    forward uses; read the masters back and require them equal. Returns Adam's step."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    named = [(plain_name(engine, n), p) for n, p in engine.module.named_parameters()]
    names = [n for n, _ in named]
    gathered = [None] * engine.world_size
    dist.all_gather_object(gathered, names)  # pipeline stages each hold a share
    bundle.check_names({n for share in gathered for n in share})
    opt = engine.engine.optimizer
    step = bundle.adam_step(names[0], fallback_step) if names else fallback_step
    create_adam_state(engine.engine.optimizer, step)
    partitioned = any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in named)
    masters: dict[str, torch.Tensor] = {}  # memory-mapped: kept for the read-back check
    for name, p in named:
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
        state = dict(bundle.states(name, shape))
        masters[name] = state["fp32"]
        if partitioned:
            safe_set_full_fp32_param(p, state["fp32"].to(engine.device))
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, state[key].to(engine.device), key)
            if hasattr(p, "ds_id") and p.data.numel() == p.ds_numel:
                p.data.copy_(state["fp32"].to(p.dtype))  # held whole now (persistent)
        else:  # fp32 without ZeRO: the torch optimizer updates the parameters themselves
            with torch.no_grad():
                p.copy_(state["fp32"])
            base = getattr(opt, "optimizer", opt)
            base.state[p].update({k: state[k].to(p.device).clone()
                                  for k in ("exp_avg", "exp_avg_sq")})
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: masters -> working partitions
        for i in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
    elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2, bf16: masters -> working weights
        opt.update_lp_params()
    for name, p in named:  # every rank the same calls in the same order (collectives)
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
        got = safe_get_full_fp32_param(p) if partitioned else p.detach()
        if not torch.equal(got.reshape(shape).float().cpu(), masters[name]):
            raise RuntimeError(f"{name}: the fp32 master read back differs from the "
                               "checkpoint after loading it")
    return step


def create_adam_state(opt: Any, step: int) -> None:
    """torch's Adam creates its state at the first step; the moments are set into it, so
    create it now (zeros) and set its step count; ZeRO-1/2 and bf16 link their per-parameter
    views of it (which they otherwise do after their first step)."""
    base = getattr(opt, "optimizer", opt)
    flats = next((list(getattr(opt, a)) for a in (
        "fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
        "fp32_groups_flat_partition") if hasattr(opt, a)), None)
    if flats is None:  # no ZeRO: one state per parameter
        flats = [p for g in base.param_groups for p in g["params"]]
    for flat in flats:
        state = base.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        state["step"] = adam_step_value(base, state.get("step"), step)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
