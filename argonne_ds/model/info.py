"""What a user needs to plan a job: parameter counts and training memory per GPU.

Memory model (mixed-precision Adam, as in the ZeRO paper): per parameter 2 B bf16 weight + 2 B bf16
gradient + 4 B fp32 master + 8 B Adam moments = 16 B. Activations, temporary buffers and the
ZeRO-3 gather window are NOT included; they depend on micro-batch, sequence length and
checkpointing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.model import count_parameters
from argonne_ds.model.partition import pipeline_layer_params

WEIGHT_B, GRAD_B, MASTER_B, ADAM_B = 2, 2, 4, 8
GIB = 1024**3


def balanced_partition(weights: list[int], parts: int) -> list[int]:
    """Contiguous split of `weights` into `parts` minimising the largest part (what DeepSpeed's
    'parameters' partitioning aims at); returns the part sums. Binary search on the bound."""
    parts = min(parts, len(weights))

    def pieces(bound: int) -> list[int]:
        sums = [0]
        for w in weights:
            if sums[-1] + w > bound and sums[-1] > 0:
                sums.append(0)
            sums[-1] += w
        return sums

    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(pieces(mid)) <= parts:
            hi = mid
        else:
            lo = mid + 1
    return pieces(lo)


@dataclass
class MemoryPlan:
    mode: str
    gpus: int
    params_per_gpu: int
    gpu_gib: float
    host_gib: float = 0.0


def training_memory(config: ArgonneConfig, gpus: int) -> list[MemoryPlan]:
    total = count_parameters(config)["total"]
    full = WEIGHT_B + GRAD_B + MASTER_B + ADAM_B
    stage = max(balanced_partition(pipeline_layer_params(config), gpus))
    shard = -(-total // gpus)
    return [
        # Pipeline with `gpus` stages and one data-parallel replica: each GPU holds its stage.
        MemoryPlan("pipeline", gpus, stage, stage * full / GIB),
        # ZeRO-3: weights, grads and optimizer state all partitioned over the GPUs.
        MemoryPlan("zero3", gpus, shard, shard * full / GIB),
        # ZeRO-3 with the optimizer (fp32 master + moments) on the host.
        MemoryPlan("zero3_offload", gpus, shard, shard * (WEIGHT_B + GRAD_B) / GIB,
                   shard * (MASTER_B + ADAM_B) / GIB),
    ]


def model_info(config: ArgonneConfig, gpu_counts: list[int]) -> dict:
    return {
        "config": config.to_diff_dict() | {"head_dim": config.head_dim},
        "parameters": count_parameters(config),
        "memory": [asdict(p) for n in gpu_counts for p in training_memory(config, n)],
    }


def format_model_info(name: str, info: dict) -> str:
    c, p = info["config"], info["parameters"]
    lines = [f"model {name}"]
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
            "rope_theta", "tie_word_embeddings")
    lines += [f"  {k:<26}{c.get(k)}" for k in keys]
    rope = c.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        lines.append(f"  {'rope_parameters':<26}" + ", ".join(
            f"{k}={v}" for k, v in sorted(rope.items()) if k != "rope_theta"))
    lines += [
        "parameters",
        f"  {'embedding (in + out)':<26}{p['embedding']:>16,}",
        f"  {'non-embedding':<26}{p['non_embedding']:>16,}",
        f"  {'total':<26}{p['total']:>16,}",
        "training memory per GPU (bf16 weights+grads, fp32 master, Adam; activations excluded)",
        f"  {'mode':<15}{'GPUs':>5}{'params/GPU':>16}{'GPU GiB':>10}{'host GiB':>10}",
    ]
    for m in info["memory"]:
        host = f"{m['host_gib']:>10.1f}" if m["host_gib"] else f"{'-':>10}"
        lines.append(f"  {m['mode']:<15}{m['gpus']:>5}{m['params_per_gpu']:>16,}"
                     f"{m['gpu_gib']:>10.1f}{host}")
    if info.get("partition"):
        lines.append("pipeline partition by compute (layers: 0 embedding, 1..L blocks, then norm "
                     "and head; compute in blocks' FLOPs)")
    for p in info.get("partition", []):
        spans = " | ".join(f"{a}-{b - 1}: {x:g}" for a, b, x in zip(
            p["bounds"], p["bounds"][1:], p["blocks_of_compute"]))
        lines.append(f"  {p['stages']:>2} stages  {spans}  balance {100 * p['balance']:.2f} % "
                     f"(DeepSpeed 'parameters': {100 * p['parameters_balance']:.2f} %)")
    return "\n".join(lines)
