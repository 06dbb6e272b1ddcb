"""The training memory of one GPU, from a model config and a DeepSpeed JSON: weights, gradients,
optimizer, activations, the loss path, ZeRO-3's working buffers, a fixed runtime reserve.

Activations are counted tensor by tensor from what autograd keeps for backward in model.py, per
token of one block (checked against saved-tensor hooks and measured peaks on CPU:
tests/test_memory_plan.py):
  2 RMSNorms   each: its input in fp32 (4C), the rsqrt (4), the normalised x before and after
               the weight (2 x C x a)
  attention    q, k, v after RoPE and the output for SDPA/flash ((2 H + 2 K) x D x a) and its
               log-sum-exp (4 H); RoPE itself keeps nothing (cos/sin need no gradient), and the
               output's (B, T, H x D) view is no copy
  SwiGLU       gate, silu(gate), up, their product (4 F x a)
with a bytes per activation (2 bf16/fp16, 4 fp32). Activation checkpointing keeps each block's
input (C x a) and recomputes one block at a time in backward.

A tiled MLP (`mlp_tiles` n, model/layers.py) holds none of its four F-wide tensors: backward
recomputes them one piece of T/n positions at a time (the gradient of two hidden-wide tensors
for all T beside one piece's six F-wide ones).

Sequence parallelism (`sequence_parallel_size` P, engine/sequence.py) divides every term by P:
each rank holds T/P positions of a sequence, and its attention the whole sequence on H/P heads
(the same bytes); key/value heads replicated to P when fewer count P each.

The loss path: training uses the chunked head + cross-entropy in every mode (model/loss.py; the
pipeline's last stage too), which holds one chunk's logits at a time and the head weight's
gradient in fp32 beside its cast. The plain path (whole logits, then cross-entropy) holds the
logits, the log-softmax output in fp32 and its fp32 gradient (and the logits' fp32 copy and the
gradient's cast back when they are half precision): 12 bytes per logit either way.

What the plan cannot see from here is a fixed reserve: the CUDA context, NCCL's buffers and the
caching allocator's fragmentation (RESERVE_GIB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.loss import CHUNK_TOKENS
from argonne_ds.model.partition import pipeline_layer_params

GIB = 1024**3
RESERVE_GIB = 3.0  # CUDA context (~0.5), NCCL (~1), allocator fragmentation
HEADROOM = 0.10  # what "fits" leaves free


def block_activation_bytes(config: ArgonneConfig, tokens: int, a: int, sp: int = 1) -> int:
    """Bytes one block keeps for backward over `tokens` tokens (this rank's: T/P of each
    sequence under sequence parallelism `sp`), activations of `a` bytes."""
    c, h, k, d = (config.hidden_size, config.num_attention_heads,
                  max(config.num_key_value_heads, sp if sp > 1 else 0), config.head_dim)
    norms = 2 * (4 * c + 4 + 2 * c * a)
    attention = (2 * h + 2 * k) * d * a + 4 * h
    mlp = 4 * config.intermediate_size * a if config.mlp_tiles <= 1 else 0  # tiled: recomputed
    return tokens * (norms + attention + mlp)


def activation_bytes(config: ArgonneConfig, blocks: int, tokens: int, a: int,
                     checkpointing: bool, sp: int = 1) -> int:
    """What `blocks` blocks hold from forward to backward over `tokens` tokens (one
    micro-batch): every saved tensor, or with checkpointing each block's input."""
    if not checkpointing:
        return blocks * block_activation_bytes(config, tokens, a, sp)
    return blocks * tokens * config.hidden_size * a


def final_norm_bytes(config: ArgonneConfig, tokens: int, a: int) -> int:
    """The RMSNorm before the head keeps what a block's norms keep."""
    c = config.hidden_size
    return tokens * (4 * c + 4 + 2 * c * a)


def backward_bytes(config: ArgonneConfig, tokens: int, a: int, checkpointing: bool,
                   sp: int = 1) -> int:
    """The working set of one block's backward beyond what is held. Without checkpointing:
    the gradients of SwiGLU's two F-wide inputs and of two hidden-wide tensors at once. With
    it: the block's recomputed activations, and one F-wide gradient more (the recomputed
    tensors are freed as their gradients appear)."""
    c, f = config.hidden_size, config.intermediate_size
    tile = -(-tokens // config.mlp_tiles)  # tiled: one piece's MLP recomputed at a time
    if config.mlp_tiles > 1:
        return (block_activation_bytes(config, tokens, a, sp) if checkpointing else 0) + \
            tokens * 2 * c * a + tile * 6 * f * a
    if checkpointing:
        return block_activation_bytes(config, tokens, a, sp) + tokens * f * a
    return tokens * (2 * f + 2 * c) * a


def loss_path_bytes(config: ArgonneConfig, tokens: int, a: int, chunked: bool) -> int:
    """The head and cross-entropy's peak beyond the hidden states, one micro-batch."""
    v, c = config.vocab_size, config.hidden_size
    if not chunked:
        return tokens * v * 12
    chunk = min(tokens, CHUNK_TOKENS)
    half = a < 4
    # forward: one chunk's fp32 logits and logsumexp's fp32 temporary (and, in half precision,
    # the weight's cast); backward: the weight's fp32 gradient (and the fp32 cast of each
    # chunk's term in half precision) beside one chunk's logits
    forward = chunk * v * 8 + (v * c * a if half else 0)
    backward = v * c * (8 if half else 4) + chunk * v * (2 if half else 4)
    return max(forward, backward)


def step_activation_peak(config: ArgonneConfig, blocks: int, tokens: int, a: int,
                         checkpointing: bool, loss: int, in_flight: int = 1, sp: int = 1) -> int:
    """Bytes above weights, gradients and optimizer at the peak of forward + backward: what is
    held (every micro-batch in flight) plus the larger of the loss path and one block's
    backward, moments that never meet. `tokens`: this rank's (T/P each under sp)."""
    held = in_flight * activation_bytes(config, blocks, tokens, a, checkpointing, sp)
    if loss:  # the head's stage: its norm, one micro-batch in flight there
        held += final_norm_bytes(config, tokens, a)
    work = backward_bytes(config, tokens, a, checkpointing, sp) if blocks else 0
    return held + max(loss, work)


@dataclass
class Layout:
    """What the DeepSpeed JSON decides, for `gpus` GPUs."""

    mode: str  # pipeline | zero3 | data_parallel
    gpus: int
    stages: int
    dp: int
    micro_batch: int
    accumulation: int
    act_bytes: int
    checkpointing: bool
    zero_stage: int
    offload_optimizer: bool
    prefetch: int = 0  # ZeRO-3 buffers, elements
    reduce_bucket: int = 0
    sp: int = 1  # sequence_parallel_size: ranks sharing each sequence

    @classmethod
    def from_ds_config(cls, ds: dict[str, Any], gpus: int) -> Layout:
        pipe = ds.get("pipeline") or {}
        zero = ds.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        stages = int(pipe.get("stages", 1)) if "stages" in pipe else 1
        mode = "pipeline" if "stages" in pipe else ("zero3" if stage == 3 else "data_parallel")
        if gpus % stages:
            raise ValueError(f"{gpus} GPUs cannot hold {stages} pipeline stages")
        dp = gpus // stages
        micro = int(ds.get("train_micro_batch_size_per_gpu") or 1)
        total = ds.get("train_batch_size")
        accum = int(ds.get("gradient_accumulation_steps") or
                    max(1, int(total or micro * dp) // (micro * dp)))
        half = (ds.get("bf16") or {}).get("enabled") or (ds.get("fp16") or {}).get("enabled")
        ckpt = (int(pipe.get("activation_checkpoint_interval", 0)) > 0 if mode == "pipeline"
                else "activation_checkpointing" in ds)
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        sp = int(ds.get("sequence_parallel_size", 1) or 1)
        if sp > 1 and (mode == "pipeline" or gpus % sp):
            raise ValueError(f"sequence_parallel_size {sp}: needs ZeRO-3 or data parallel on a "
                             f"multiple of {sp} GPUs")
        if sp > 1:  # a group of sp ranks shares each sample: fewer replicas, more accumulation
            accum = int(ds.get("gradient_accumulation_steps") or
                        max(1, int(total or micro * dp) // (micro * dp // sp)))
        return cls(mode, gpus, stages, dp, micro, accum, 2 if half else 4, ckpt, stage, offload,
                   int(float(zero.get("stage3_prefetch_bucket_size", 5e7))) if stage == 3 else 0,
                   int(float(zero.get("reduce_bucket_size", 5e8))) if stage == 3 else 0, sp)


@dataclass
class GpuPlan:
    """One GPU's memory, GiB. For a pipeline: one stage (`stage`, its `layers`). The peak adds
    to what is held the larger of two moments that never meet: the loss path (head and
    cross-entropy, before any block's backward) and one block's backward."""

    stage: int | None
    layers: str
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float  # held from forward to backward, all micro-batches in flight
    loss: float
    backward: float
    buffers: float
    reserve: float
    in_flight: int = 1
    host: float = 0.0
    total: float = field(init=False)

    def __post_init__(self) -> None:
        self.total = (self.weights + self.gradients + self.optimizer + self.activations
                      + max(self.loss, self.backward) + self.buffers + self.reserve)


def _state(params: int, lay: Layout, shard: int) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer, host) GiB for `params` held, optimizer state split over
    `shard` ranks. Half precision: bf16 weights and gradients, fp32 gradient accumulation,
    master and Adam moments; fp32: weights, gradients, the optimizer's fp32 partition, Adam."""
    a = lay.act_bytes
    weights, grads = params * a, params * (a + (4 if a < 4 else 0))
    optimizer = params * (4 + 8) / shard
    host = 0.0
    if lay.offload_optimizer:
        host, optimizer = optimizer, 0.0
    return weights / GIB, grads / GIB, optimizer / GIB, host / GIB


def plan(config: ArgonneConfig, ds: dict[str, Any], gpus: int, seq_len: int) -> list[GpuPlan]:
    """Per-GPU memory for `gpus` GPUs under the DeepSpeed JSON `ds` at `seq_len` tokens per
    sample; a pipeline gives one plan per stage (1F1B keeps stage s's first S - s micro-batches
    in flight, at most the accumulation)."""
    lay = Layout.from_ds_config(ds, gpus)
    sp = lay.sp
    a, tokens, ckpt = lay.act_bytes, lay.micro_batch * -(-seq_len // sp), lay.checkpointing
    c, v, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    backward = backward_bytes(config, tokens, a, ckpt, sp) / GIB
    if lay.mode == "pipeline":
        from argonne_ds.model.pipe import partition_bounds  # imports deepspeed

        method = (ds.get("pipeline") or {}).get("partition_method", "compute")
        bounds = partition_bounds(config, lay.stages, method, seq_len)
        counts = pipeline_layer_params(config)
        out = []
        for s in range(lay.stages):
            lo, hi = bounds[s], bounds[s + 1]
            blocks = len([i for i in range(lo, hi) if 1 <= i <= L])
            in_flight = min(lay.stages - s, lay.accumulation)
            held = in_flight * activation_bytes(config, blocks, tokens, a, ckpt)
            last = hi == L + 3
            if last:  # one micro-batch in flight there
                held += final_norm_bytes(config, tokens, a)
            # DeepSpeed's pipe buffers: inputs and outputs of max(2, in flight) micro-batches
            buffers = 2 * max(2, in_flight) * tokens * c * a
            w, g, o, host = _state(sum(counts[lo:hi]), lay, lay.dp)
            out.append(GpuPlan(
                s, f"{lo}-{hi - 1}", sum(counts[lo:hi]), w, g, o, held / GIB,
                loss_path_bytes(config, tokens, a, chunked=True) / GIB if last else 0.0,
                backward if blocks else 0.0, buffers / GIB, RESERVE_GIB, in_flight, host))
        return out
    total = sum(pipeline_layer_params(config))
    held = activation_bytes(config, L, tokens, a, ckpt, sp) + final_norm_bytes(config, tokens, a)
    loss = loss_path_bytes(config, tokens, a, chunked=True) / GIB
    if lay.mode == "zero3":
        params = -(-total // gpus)
        w, g, o, host = _state(params, lay, 1)
        # The gathered head (or embedding; its gradient is in the loss path), the prefetch
        # bucket, two reduce buckets (overlap_comm).
        buffers = v * c * a + lay.prefetch * a + 2 * lay.reduce_bucket * a
    else:
        params = total
        w, g, o, host = _state(params, lay, lay.dp if lay.zero_stage >= 1 else 1)
        buffers = 0
    return [GpuPlan(None, "all", params, w, g, o, held / GIB, loss, backward, buffers / GIB,
                    RESERVE_GIB, 1, host)]


def memory_report(config: ArgonneConfig, ds: dict[str, Any], gpus: int, seq_len: int,
                  gpu_gib: float) -> dict[str, Any]:
    lay = Layout.from_ds_config(ds, gpus)
    plans = plan(config, ds, gpus, seq_len)
    worst = max(plans, key=lambda p: p.total)
    headroom = 1 - worst.total / gpu_gib
    return {"layout": asdict(lay), "seq_len": seq_len, "gpu_gib": gpu_gib,
            "gpus": [asdict(p) for p in plans], "peak_gib": worst.total,
            "headroom": headroom, "fits": headroom >= HEADROOM}


def format_memory_report(name: str, report: dict[str, Any]) -> str:
    lay = report["layout"]
    how = (f"{lay['stages']} stages x {lay['dp']} data-parallel" if lay["mode"] == "pipeline"
           else f"{lay['gpus']} GPUs" + (f", sequence parallel {lay['sp']}" if lay["sp"] > 1
                                         else ""))
    lines = [
        f"memory per GPU: {lay['mode']}, {how}, micro-batch {lay['micro_batch']} x "
        f"{report['seq_len']} tokens, accumulation {lay['accumulation']}, "
        f"{'bf16/fp16' if lay['act_bytes'] == 2 else 'fp32'}, activation checkpointing "
        f"{'on' if lay['checkpointing'] else 'off'}" + (", optimizer on the host"
                                                        if lay["offload_optimizer"] else ""),
        f"  {'stage':<6}{'layers':<8}{'params':>15}{'weights':>9}{'grads':>8}{'optim':>8}"
        f"{'activ':>8}{'loss':>7}{'bwd':>6}{'buffers':>9}{'reserve':>9}{'total':>8}  GiB",
    ]
    for g in report["gpus"]:
        stage = "-" if g["stage"] is None else str(g["stage"])
        lines.append(
            f"  {stage:<6}{g['layers']:<8}{g['params']:>15,}{g['weights']:>9.1f}"
            f"{g['gradients']:>8.1f}{g['optimizer']:>8.1f}{g['activations']:>8.1f}"
            f"{g['loss']:>7.1f}{g['backward']:>6.1f}{g['buffers']:>9.1f}{g['reserve']:>9.1f}{g['total']:>8.1f}"
            + (f"  (host {g['host']:.1f})" if g["host"] else "")
            + (f"  ({g['in_flight']} micro-batch{'es' if g['in_flight'] > 1 else ''} in flight)"
               if g["stage"] is not None else ""))
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(f"  peak {report['peak_gib']:.1f} of {report['gpu_gib']:.0f} GiB: headroom "
                 f"{100 * report['headroom']:.0f} % -> {name} {verdict} (needs >= "
                 f"{100 * HEADROOM:.0f} % free)")
    return "\n".join(lines)


def longest_context(config: ArgonneConfig, ds: dict[str, Any], gpus: int, gpu_gib: float,
                    sp: int, step: int = 1024, limit: int = 1 << 21) -> tuple[int, float] | None:
    """The longest sequence (a multiple of `step`, at most `limit`) one sample of which per
    micro-batch fits `gpus` GPUs with the headroom, at sequence parallelism `sp`: (tokens, peak
    GiB), or None when not even `step` fits."""
    trial = {**ds, "sequence_parallel_size": sp, "train_micro_batch_size_per_gpu": 1}
    trial.pop("train_batch_size", None)
    trial.setdefault("gradient_accumulation_steps", 1)

    def peak(tokens: int) -> dict[str, Any]:
        return memory_report(config, trial, gpus, tokens, gpu_gib)

    if not peak(step)["fits"]:
        return None
    lo, hi = 1, 2  # in steps: lo fits, hi is the first to test
    while hi * step <= limit and peak(hi * step)["fits"]:
        lo, hi = hi, hi * 2
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:  # lo fits, hi does not (or is past the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid * step)["fits"] else (lo, mid)
    return lo * step, peak(lo * step)["peak_gib"]


def sequence_degrees(config: ArgonneConfig, gpus: int) -> list[int]:
    """The sequence-parallel degrees the model takes on `gpus` GPUs (engine/sequence.py)."""
    h, k = config.num_attention_heads, config.num_key_value_heads
    return [p for p in range(1, gpus + 1)
            if gpus % p == 0 and h % p == 0 and (k % p == 0 or p % k == 0)]


def format_longest_context(name: str, config: ArgonneConfig, ds: dict[str, Any],
                           gpu_counts: list[int], gpu_gib: float) -> str:
    lines = [f"longest context that fits ({name}, micro-batch 1, {gpu_gib:.0f} GiB GPUs, "
             f"{100 * HEADROOM:.0f} % headroom), by sequence-parallel degree:",
             f"  {'GPUs':>5}  {'SP':>3}  {'tokens':>10}  {'peak GiB':>8}"]
    for gpus in gpu_counts:
        for sp in sequence_degrees(config, gpus):
            found = longest_context(config, ds, gpus, gpu_gib, sp)
            tokens, peak = (f"{found[0]:,}", f"{found[1]:.1f}") if found else ("none", "-")
            if found and found[0] >= 1 << 21:
                tokens = f">={found[0]:,}"  # the search's limit
            lines.append(f"  {gpus:>5}  {sp:>3}  {tokens:>10}  {peak:>8}")
    return "\n".join(lines)
