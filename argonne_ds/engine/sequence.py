"""Sequence parallelism with DeepSpeed Ulysses: `"sequence_parallel_size": P` in the JSON.

P consecutive ranks form a sequence-parallel group and train on the same samples, each on T/P
positions of every sequence: the embedding, MLPs, norms and the loss on its own positions;
attention by DeepSpeed's `DistributedAttention` (deepspeed.sequence.layer), whose all-to-all
gives each rank the whole sequence on H/P query heads (and their key/value heads), runs the
model's own causal, document-masked attention there (`model.layers.sequence_core`), and sends the
result back along the sequence.

To DeepSpeed the job stays plain data parallel over every rank (no mpu): ZeRO shards over all of
them and averages gradients over all of them, the same in every code path (ZeRO-3's contiguous
and reduce-scatter reductions, ZeRO-1/2, none). So each rank's loss is its share of the whole
sequences' mean times P (model.py): the average over the W = DP x P ranks is then the mean over
the DP replicas of their SP = 1 gradients. (DeepSpeed's own SP accounting, `mpu` with
`sequence_parallel_size`, halves ZeRO-3's gradients on its reduce-scatter path in 0.19.8: a
gradient-norm check in tests/test_sequence_parallel.py caught it.) A checkpoint is a
data-parallel one over W ranks, so it resumes at any SP degree on the same ranks as it is.

Key/value heads: with K >= P, K/P per rank (query head groups stay whole); with K < P and P a
multiple of K, each is replicated P/K times first, so every rank holds the one its queries read.
A pipeline does not take sequence parallelism (refused in one line), nor `dynamic` RoPE (its
frequencies follow the longest position of the call, which differs by shard).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.layers import sequence_core
from argonne_ds.model.model import ArgonneModel, Attention
from argonne_ds.run_config import ConfigError

KEY = "sequence_parallel_size"


def sequence_parallel_size(ds_config: dict[str, Any]) -> int:
    value = ds_config.get(KEY, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{KEY} must be a positive integer, got {value!r}")
    return value


def check(config: ArgonneConfig, size: int, world: int, pipeline: bool) -> None:
    """Every refusal in one line, before any group or engine is made."""
    if size == 1:
        return
    if pipeline:
        raise ConfigError(f"{KEY} {size} with a pipeline: sequence parallelism runs under "
                          "ZeRO-3 or plain data parallel; drop the JSON's pipeline section or "
                          f"set {KEY} to 1")
    if world % size:
        raise ConfigError(f"{KEY} {size} does not divide the {world} ranks")
    h, k = config.num_attention_heads, config.num_key_value_heads
    if h % size:
        raise ConfigError(f"{KEY} {size} does not divide the {h} attention heads")
    if k % size and size % k:
        raise ConfigError(f"{KEY} {size} and the {k} key/value heads: one must divide the "
                          "other (fewer key/value heads than the degree are replicated)")
    if config.rope_type == "dynamic":
        raise ConfigError(f"{KEY} {size} with rope_type dynamic: its frequencies follow each "
                          "call's longest position, which differs by shard; use yarn or linear")


def init_groups(size: int) -> tuple[Any, int]:
    """This rank's sequence-parallel group (consecutive ranks) and its rank in it. Every rank
    makes every group, in the same order."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine, rank % size


class _Ulysses(nn.Module):
    """DistributedAttention around sequence_core, key/value heads replicated where K < P."""

    def __init__(self, group: Any, repeat: int) -> None:
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.repeat = repeat
        self.inner = DistributedAttention(sequence_core, group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch_dim: int,
                rotary: Any, *args: Any) -> torch.Tensor:
        if self.repeat > 1:  # (B, T/P, K, D) -> (B, T/P, P, D)
            k = k.repeat_interleave(self.repeat, dim=2)
            v = v.repeat_interleave(self.repeat, dim=2)
        return self.inner(q, k, v, batch_dim, rotary, *args)


def attach(model: nn.Module, size: int, group: Any, rank: int) -> None:
    """Route the model's attention through Ulysses and give it its shard of each sequence."""
    if not isinstance(model, ArgonneModel):
        raise ConfigError(f"{KEY} needs the plain model (ZeRO-3 or data parallel)")
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        repeat = size // attn.n_kv if attn.n_kv < size else 1
        # Not a submodule: it holds no parameters, and ZeRO-3's hooks must not see it.
        object.__setattr__(attn, "sequence_attention", _Ulysses(group, repeat))
    model.sequence_shard = (rank, size)


def deepspeed_config(ds_config: dict[str, Any], size: int) -> dict[str, Any]:
    """The JSON as DeepSpeed must see it: data parallel over all ranks, so its batch counts
    each sample once per rank of a group (the run's own global batch is the JSON's)."""
    out = {k: v for k, v in ds_config.items() if k != KEY}
    if size > 1 and "train_batch_size" in out:
        out["train_batch_size"] = int(out["train_batch_size"]) * size
    return out
