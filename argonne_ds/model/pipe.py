"""Argonne 2.0 as a DeepSpeed `PipelineModule`: a flat list of `LayerSpec`s.

Layer i of the pipeline (global index, independent of how layers are split over stages):
    0           EmbeddingPipe   input_ids (B, T) -> hidden (B, T, C)
    1 .. L      BlockPipe       hidden -> hidden (block i-1 of the plain model)
    L + 1       NormPipe        final RMSNorm
    L + 2       HeadPipe        hidden -> logits (B, T, V)
and the loss (`causal_lm_loss`) as the module's loss_fn on the last stage.

The *Pipe classes subclass the plain modules and only adapt `forward`, so the parameter names inside
each layer are the plain model's: `"<layer>.<path>"` maps to the plain name by a fixed table
(`pipe_to_plain_key` / `plain_to_pipe_key`), exact in both directions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.model import (
    ArgonneBlock,
    RMSNorm,
    RotaryEmbedding,
    causal_lm_loss,
    init_module,
)

PARTITION_METHODS = ("parameters", "uniform", "type:BlockPipe")


def _init(module: nn.Module, config: ArgonneConfig) -> None:
    for m in module.modules():
        init_module(m, config)


class EmbeddingPipe(nn.Embedding):
    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config.vocab_size, config.hidden_size)
        _init(self, config)


class BlockPipe(ArgonneBlock):
    """A block that computes its own RoPE tables (cheap, fp32) so stages pass only hidden states."""

    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.num_hidden_layers = config.num_hidden_layers
        _init(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        cos, sin = self.rotary(x.shape[1], x.device, x.dtype)
        return super().forward(x, cos, sin)


class NormPipe(RMSNorm):
    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config.hidden_size, config.rms_norm_eps)


class HeadPipe(nn.Linear):
    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config.hidden_size, config.vocab_size, bias=False)
        _init(self, config)


def layer_specs(config: ArgonneConfig) -> list[LayerSpec]:
    if config.tie_word_embeddings:
        raise ValueError(
            "tie_word_embeddings=True is not supported by the pipeline form (Argonne 2.0 is "
            "untied); use a ZeRO config or set tie_word_embeddings=false"
        )
    return [
        LayerSpec(EmbeddingPipe, config),
        *(LayerSpec(BlockPipe, config) for _ in range(config.num_hidden_layers)),
        LayerSpec(NormPipe, config),
        LayerSpec(HeadPipe, config),
    ]


def build_pipeline_module(
    config: ArgonneConfig,
    num_stages: int,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
    **kwargs: object,
) -> PipelineModule:
    """The model as a `PipelineModule`. Needs an initialised process group (deepspeed.comm)."""
    if partition_method not in PARTITION_METHODS:
        raise ValueError(
            f"partition_method {partition_method!r}: choose one of {PARTITION_METHODS}")
    if activation_checkpoint_interval == 0 and config.use_gradient_checkpointing:
        activation_checkpoint_interval = 1
    return PipelineModule(
        layers=layer_specs(config),
        num_stages=num_stages,
        loss_fn=causal_lm_loss,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        # Only blocks: with reentrant checkpointing a checkpointed embedding gets no gradient.
        checkpointable_layers=["BlockPipe"],
        **kwargs,
    )


# ---- state conversion: pipeline "<layer>.<path>" <-> plain model names ------------------------


def plain_to_pipe_key(key: str, num_layers: int) -> str:
    if key == "embed_tokens.weight":
        return "0.weight"
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
        return f"{int(m.group(1)) + 1}.{m.group(2)}"
    if key == "norm.weight":
        return f"{num_layers + 1}.weight"
    if key == "lm_head.weight":
        return f"{num_layers + 2}.weight"
    raise KeyError(f"no pipeline mapping for parameter {key!r}")


def pipe_to_plain_key(key: str, num_layers: int) -> str:
    m = re.fullmatch(r"(\d+)\.(.+)", key)
    if not m:
        raise KeyError(f"not a pipeline parameter name: {key!r}")
    layer, rest = int(m.group(1)), m.group(2)
    if layer == 0 and rest == "weight":
        return "embed_tokens.weight"
    if 1 <= layer <= num_layers:
        return f"blocks.{layer - 1}.{rest}"
    if layer == num_layers + 1 and rest == "weight":
        return "norm.weight"
    if layer == num_layers + 2 and rest == "weight":
        return "lm_head.weight"
    raise KeyError(f"no plain-model mapping for pipeline parameter {key!r}")


def plain_to_pipe_state(
    state: Mapping[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    return {plain_to_pipe_key(k, num_layers): v for k, v in state.items()}


def pipe_to_plain_state(
    state: Mapping[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    return {pipe_to_plain_key(k, num_layers): v for k, v in state.items()}


def load_plain_state_into_pipe(module: PipelineModule, state: Mapping[str, torch.Tensor],
                               num_layers: int) -> None:
    """Copy the plain model's weights into this stage's layers (each stage takes its own keys)."""
    plain = {plain_to_pipe_key(k, num_layers): k for k in state}  # names only: `state` may
    own = module.state_dict()  # read lazily, and a stage needs its own layers alone
    missing = [k for k in own if k not in plain]
    if missing:
        raise KeyError(f"plain state lacks pipeline parameters {missing[:5]}")
    module.load_state_dict({k: state[plain[k]] for k in own}, strict=True)
