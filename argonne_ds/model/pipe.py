"""Argonne 2.0 as a DeepSpeed `PipelineModule`: a flat list of `LayerSpec`s.

Layer i of the pipeline (global index, independent of how layers are split over stages):
    0           EmbeddingPipe   (input_ids, labels) -> (hidden (B, T, C), labels)
    1 .. L      BlockPipe       (hidden, labels) -> (hidden, labels) (block i-1 of the plain model)
    L + 1       NormPipe        final RMSNorm
    L + 2       HeadPipe        (hidden, labels) -> the loss: the head and cross-entropy in chunks
                                (model/loss.py), the (B, T, V) logits never exist
The labels travel with the hidden states (an integer tensor: DeepSpeed sends tuples between
stages and returns gradients only for the floating tensors, as gpt-neox passes its attention
mask), so the head's weight is used inside the module's forward. Used in the loss_fn instead,
its gradient is lost in bf16: DeepSpeed's BF16_Optimizer clears the bf16 gradients when the
gradient reaches the module's output (the backward prologue hook), after the loss_fn's part of the
graph has written the head's. `pipeline_batches` turns (input_ids, labels) micro-batches into
what the pipeline engine loads; the module's loss_fn passes the head's loss on, or computes it
from logits when generation asked the head for them (`HeadPipe.return_logits`).
With document masking or document positions on, each position's document id (B, T) int64
travels too: (hidden, labels, doc_ids).

The *Pipe classes subclass the plain modules and only adapt `forward`, so the parameter names inside
each layer are the plain model's: `"<layer>.<path>"` maps to the plain name by a fixed table
(`pipe_to_plain_key` / `plain_to_pipe_key`), exact in both directions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.loss import LMHead
from argonne_ds.model.model import (
    ArgonneBlock,
    RMSNorm,
    RotaryEmbedding,
    causal_lm_loss,
    document_ids,
    document_layout,
    init_module,
    rotary_at,
)
from argonne_ds.model.partition import (
    balance,
    compute_partition,
    layer_flops,
    pipeline_layer_params,
    stage_loads,
)

# "compute": by forward FLOPs (model/partition.py), from the config alone; DeepSpeed's own methods
# stay available ("parameters" builds every layer on every rank to count its parameters).
PARTITION_METHODS = ("compute", "parameters", "uniform", "type:BlockPipe")


def _init(module: nn.Module, config: ArgonneConfig) -> None:
    for m in module.modules():
        init_module(m, config)


# Between stages: hidden (B, T, C), labels (B, T) int64 and, with document masking/positions
# on, doc_ids (B, T) int64.
Payload = tuple[torch.Tensor, ...]


def pipeline_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                     ) -> Iterator[tuple[Payload, torch.Tensor]]:
    """(input_ids, labels) micro-batches as the pipeline engine loads them: the first stage
    takes (input_ids, labels), the last stage the labels."""
    for x, y in batches:
        yield (x, y), y


class EmbeddingPipe(nn.Embedding):
    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config.vocab_size, config.hidden_size)
        self.separator_id = config.document_separator_id if config.uses_document_ids else None
        _init(self, config)

    def forward(self, inputs: Payload) -> Payload:
        input_ids, labels = inputs  # (B, T) each
        x = super().forward(input_ids)  # (B, T, C)
        if self.separator_id is None:
            return x, labels
        # Only the first stage sees the tokens, so the ids travel on with the hidden states.
        return x, labels, document_ids(input_ids, self.separator_id)


class BlockPipe(ArgonneBlock):
    """A block that computes its own RoPE tables (cheap, fp32) so stages pass only the hidden
    states, the labels (and the document ids, when document masking or positions are on)."""

    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config)
        self.rotary = RotaryEmbedding(config)
        self.num_hidden_layers = config.num_hidden_layers
        self.config = config if config.uses_document_ids else None
        _init(self, config)

    def forward(self, inputs: Payload) -> Payload:
        x, *rest = inputs  # (B, T, C), labels (B, T)[, doc_ids (B, T)]
        if self.config is None:
            cos, sin = self.rotary(x.shape[1], x.device, x.dtype)
            return super().forward(x, cos, sin), *rest
        doc_ids = rest[1]
        # Rebuilt in every block from the ids (O(B*T*T) compares, small next to attention):
        # sending the (B, 1, T, T) mask between stages would cost far more.
        docs, positions = document_layout(doc_ids, x, self.config)
        if positions is None:
            cos, sin = self.rotary(x.shape[1], x.device, x.dtype)  # (T, D)
        else:
            cos, sin = rotary_at(self.rotary, positions, x.dtype)  # (B, 1, T, D)
        return super().forward(x, cos, sin, docs=docs), *rest


class NormPipe(RMSNorm):
    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs: Payload) -> Payload:
        return super().forward(inputs[0]), inputs[1]  # (B, T, C), labels


class HeadPipe(LMHead):
    """The head and the loss (model/loss.py's chunks) in one forward; logits instead while
    `return_logits` is set (generation), each position's loss while `per_token` is (the
    held-out loss by position)."""

    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config.hidden_size, config.vocab_size, bias=False)
        self.return_logits = False
        self.per_token = False
        _init(self, config)

    def forward(self, inputs: Payload) -> torch.Tensor:  # type: ignore[override]
        x, labels = inputs
        if self.return_logits:
            return super().forward(x)
        return super().forward(x, labels, self.per_token)


def pipeline_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The module's loss_fn: the head's loss as it is, the mean of per-position losses (B, T),
    or the loss of the logits (B, T, V) it returned."""
    if outputs.dim() == 2:
        valid = labels != -100
        return (outputs * valid).sum() / valid.sum().clamp(min=1)
    return outputs if outputs.dim() == 0 else causal_lm_loss(outputs, labels)


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


class ArgonnePipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule with one more partition method, "compute": the stage bounds
    are given (model/partition.py's `compute_partition` of each layer's FLOPs), nothing is built."""

    def __init__(self, *args: object, compute_bounds: list[int] | None = None,
                 **kwargs: object) -> None:
        self._compute_bounds = compute_bounds  # read by _partition_layers inside __init__
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        if method != "compute":
            super()._partition_layers(method)
            return
        assert self._compute_bounds is not None
        self.parts = list(self._compute_bounds)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def build_pipeline_module(
    config: ArgonneConfig,
    num_stages: int,
    partition_method: str = "compute",
    activation_checkpoint_interval: int = 0,
    seq_len: int | None = None,
    **kwargs: object,
) -> PipelineModule:
    """The model as a `PipelineModule`. Needs an initialised process group (deepspeed.comm).
    `seq_len` (default: the context length) weighs attention in the "compute" partition."""
    if partition_method not in PARTITION_METHODS:
        raise ValueError(
            f"partition_method {partition_method!r}: choose one of {PARTITION_METHODS}")
    if activation_checkpoint_interval == 0 and config.use_gradient_checkpointing:
        activation_checkpoint_interval = 1
    bounds = None
    if partition_method == "compute":
        flops = layer_flops(config, seq_len or config.max_position_embeddings)
        bounds = compute_partition(flops, num_stages)
    return ArgonnePipelineModule(
        layers=layer_specs(config),
        num_stages=num_stages,
        loss_fn=pipeline_loss,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        # Only blocks: with reentrant checkpointing a checkpointed embedding gets no gradient.
        checkpointable_layers=["BlockPipe"],
        compute_bounds=bounds,
        **kwargs,
    )


def partition_bounds(config: ArgonneConfig, num_stages: int, method: str = "compute",
                     seq_len: int | None = None) -> list[int]:
    """The stage bounds `build_pipeline_module` gets for `method`, from the config alone (the
    memory plan's split): ours for "compute", DeepSpeed's own functions for the others."""
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    if method == "compute":
        return compute_partition(layer_flops(config, seq_len or config.max_position_embeddings),
                                 num_stages)
    if method == "parameters":
        return parameters_partition(config, num_stages)
    layers = len(pipeline_layer_params(config))
    if method == "uniform":
        return [int(b) for b in partition_uniform(layers, num_stages)]
    if method == "type:BlockPipe":
        blocks = [int(1 <= i <= config.num_hidden_layers) for i in range(layers)]
        return [int(b) for b in partition_balanced(blocks, num_stages)]
    raise ValueError(f"partition_method {method!r}: choose one of {PARTITION_METHODS}")


def parameters_partition(config: ArgonneConfig, num_stages: int) -> list[int]:
    """The bounds DeepSpeed's "parameters" method gives (its `partition_balanced` of each
    layer's parameter count), counted from the config instead of built layers."""
    from deepspeed.runtime.utils import partition_balanced

    return [int(b) for b in partition_balanced(pipeline_layer_params(config), num_stages)]


def partition_report(config: ArgonneConfig, stages: int, seq_len: int) -> dict:
    """Each stage's layers and compute under the "compute" partition, against DeepSpeed's
    "parameters" one (its partition_balanced of the parameter counts)."""
    flops = layer_flops(config, seq_len)
    block = flops[1] if config.num_hidden_layers else 1.0
    bounds = compute_partition(flops, stages)
    params = parameters_partition(config, stages)
    return {"stages": stages, "bounds": bounds,
            "blocks_of_compute": [round(x / block, 2) for x in stage_loads(flops, bounds)],
            "balance": balance(flops, bounds), "parameters_bounds": params,
            "parameters_balance": balance(flops, params)}


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
