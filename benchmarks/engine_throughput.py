"""Engine overhead: tokens/s of a model trained through `argonne_ds.engine.Engine` against a bare
PyTorch loop of the same model, measured in one run of this script.

What is compared (same preset, micro-batch, gradient accumulation, sequence length, precision,
optimizer and threads; synthetic random tokens, since only speed is measured):
    bare    ArgonneModel + torch.optim.AdamW (fused) + grad clipping, no DeepSpeed
    zero0   Engine, data parallel on one rank, ZeRO stage 0
    zero1   Engine, data parallel on one rank, ZeRO stage 1
    zero3   Engine, ZeRO stage 3 on one rank (not in the CPU default)
    pipe    Engine, a one-stage PipelineModule (train_batch)
Warm-up steps are excluded. Then every mode runs `--reps` timed repetitions of `--steps`
optimizer steps; the repetitions are interleaved (bare, zero0, ..., then again, with the order
rotated each time) so that a change of background load hits every mode alike. Reported: the
median tokens/s over the repetitions and its ratio to the bare loop's median (target >= 0.8 on
CPU). The 1-minute load average is printed before and after: on a shared machine, re-run when
it is low.

Run (CPU, one process; DeepSpeed needs no launcher here, the Engine sets RANK/WORLD_SIZE):
    python benchmarks/engine_throughput.py
    python benchmarks/engine_throughput.py --preset tiny --micro-batch 4 --grad-accum 2 \
        --seq-len 256 --threads 2 --modes zero0,zero1,pipe --warmup 2 --reps 5 --steps 3
(those are the defaults; ~2-3 minutes on 2 idle cores)

The pieces (BareLoop, EngineRunner, measure, ds_config) are shared with gpu_throughput.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import cycle
from typing import Any, Protocol

import torch

from argonne_ds.config import ArgonneConfig, load_model_config
from argonne_ds.model.model import ArgonneModel, count_parameters

Batch = tuple[torch.Tensor, torch.Tensor]
ENGINE_MODES = ("zero0", "zero1", "zero3", "pipe")
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


# ---- process set-up ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_process(device: str, threads: int | None) -> None:
    """Environment for a one-process DeepSpeed job. Call before anything imports deepspeed: the
    accelerator is fixed at import. A free port, not the Engine's default 29500, because other
    jobs on a shared machine may hold that one."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # DeepSpeed's ZeRO calls the deprecated *_tensor collectives on every step: one line each.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batches(vocab_size: int, micro: int, seq_len: int, count: int,
                      device: torch.device, seed: int = 0, separator: int | None = None,
                      doc_len: int = 1024) -> list[Batch]:
    """`count` (input_ids, labels) micro-batches of uniform random tokens, already on `device`
    so that no mode pays a host-to-device copy the others do not. `separator`: a document
    separator every ~`doc_len` tokens (random lengths), for document masking."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, vocab_size, (count, micro, seq_len + 1), generator=g)
    if separator is not None:
        ends = torch.rand(blocks.shape, generator=g) < 1.0 / doc_len
        blocks[ends] = separator
    return [(b[:, :-1].contiguous().to(device), b[:, 1:].contiguous().to(device)) for b in blocks]


# ---- the two kinds of runner ------------------------------------------------------------------


class Runner(Protocol):
    name: str
    build_s: float
    note: str  # what actually runs, e.g. the optimizer classes

    def step(self, data: Iterator[Batch]) -> float:
        """One optimizer step over one global batch; returns the mean loss (a host sync)."""
        ...

    def close(self) -> None: ...


def ds_config(mode: str, micro: int, accum: int, precision: str = "fp32",
              fused: bool = True, compile: bool = False, deepspeed_adam: bool = False
              ) -> dict[str, Any]:
    """A plain DeepSpeed JSON for one mode. No LR scheduler: the bare loop has none either.
    `torch_adam` avoids the FusedAdam JIT build; `fused` reaches torch.optim.AdamW(fused=...);
    `deepspeed_adam`: DeepSpeed's own FusedAdam instead (JIT-built with nvcc at the first run);
    `compile`: the "torch_compile" section (every block through torch.compile, inductor)."""
    if mode not in ENGINE_MODES:
        raise ValueError(f"mode {mode!r}: choose from {ENGINE_MODES}")
    zero: dict[str, Any] = {"stage": {"zero0": 0, "zero1": 1, "zero3": 3, "pipe": 0}[mode]}
    if mode == "pipe" and precision == "bf16":
        zero["stage"] = 1  # bf16 pipelines need ZeRO-1 (stage 0 cannot reload its checkpoints)
    if mode == "zero3":
        zero.update({"overlap_comm": True, "contiguous_gradients": True,
                     "reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                     "stage3_param_persistence_threshold": 100_000})
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": {"type": "AdamW", "params": {
            "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
            **({} if deepspeed_adam else {"torch_adam": True, "fused": fused})}},
        "zero_optimization": zero,
    }
    if compile:
        cfg["torch_compile"] = {"enabled": True, "backend": "inductor"}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if mode == "pipe":
        cfg["pipeline"] = {"stages": 1, "partition_method": "parameters",
                           "activation_checkpoint_interval": 0}
    return cfg


class BareLoop:
    """The reference loop: what a careful user writes without DeepSpeed.

    fp32: the model's parameters are the optimizer's. bf16: the same arithmetic as DeepSpeed's
    bf16 modes -- bf16 weights for forward/backward (gradients accumulate in bf16 over the
    micro-batches), fp32 master weights and fused AdamW states, clipping on the fp32 gradients,
    then the masters copied back into the bf16 weights. One host sync per optimizer step."""

    def __init__(self, config: ArgonneConfig, accum: int, precision: str,
                 device: torch.device, fused: bool = True, seed: int = 1234,
                 name: str = "bare", compile: bool = False) -> None:
        from argonne_ds.engine.engine import param_groups  # the Engine's weight-decay grouping

        t0 = time.perf_counter()
        self.name, self.accum, self.device = name, accum, device
        torch.manual_seed(seed)
        with device:  # build on the device: a CPU init of a 1B model takes seconds
            self.model = ArgonneModel(config)
        self.model.train()
        if compile:
            from argonne_ds.model.model import compile_blocks

            compile_blocks(self.model, backend="inductor")
        groups = param_groups(self.model, WEIGHT_DECAY)
        self.lp: list[torch.nn.Parameter] = []
        self.master: list[torch.Tensor] = []
        if precision == "bf16":
            masters = {id(p): p.detach().clone().requires_grad_(True)
                       for p in self.model.parameters()}
            self.model.to(dtype=torch.bfloat16)  # same Parameter objects, bf16 data
            self.lp = list(self.model.parameters())
            self.master = [masters[id(p)] for p in self.lp]
            groups = [{**g, "params": [masters[id(p)] for p in g["params"]]} for g in groups]
        elif precision != "fp32":
            raise ValueError(f"precision {precision!r}: choose fp32 or bf16")
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=fused)
        self.note = f"AdamW(fused={fused}) on {'fp32 masters' if self.master else 'the weights'}"
        synchronize(device)
        self.build_s = time.perf_counter() - t0

    def step(self, data: Iterator[Batch]) -> float:
        total = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            x, y = next(data)
            loss = self.model(x, labels=y).loss
            (loss / self.accum).backward()
            total += loss.detach().float()
        if self.master:
            for p, m in zip(self.lp, self.master):
                m.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master:
            with torch.no_grad():
                torch._foreach_copy_(self.lp, self.master)
        return float(total) / self.accum

    def close(self) -> None:
        del self.model, self.optimizer, self.params, self.lp, self.master


class EngineRunner:
    """The framework's path: `Engine(config, ds_json).train_step(data)`, nothing else."""

    def __init__(self, name: str, config: ArgonneConfig, ds_cfg: dict[str, Any],
                 device: torch.device) -> None:
        from argonne_ds.engine.engine import Engine

        t0 = time.perf_counter()
        self.name = name
        self.engine = Engine(config, ds_cfg, weight_decay=WEIGHT_DECAY)
        basic = self.engine.engine.basic_optimizer
        self.note = (f"{self.engine.mode}: {type(self.engine.optimizer).__name__} over "
                     f"{type(basic).__name__}(fused={basic.defaults.get('fused')})")
        synchronize(device)
        self.build_s = time.perf_counter() - t0

    def step(self, data: Iterator[Batch]) -> float:
        return self.engine.train_step(data).loss

    def close(self) -> None:
        self.engine.engine.destroy()
        del self.engine


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- timing -----------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    build_s: float = 0.0
    tok_s: list[float] = field(default_factory=list)
    last_loss: float = float("nan")
    peak_mem_gib: float | None = None
    error: str | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.tok_s) if self.tok_s else float("nan")


def measure(runners: Sequence[Runner], batches: Sequence[Batch], tokens_per_step: int,
            warmup: int, reps: int, steps: int, device: torch.device) -> list[Result]:
    """Warm every runner up, then `reps` rounds in which each runner times `steps` steps; the
    order rotates every round. Returns one Result per runner, tokens/s per repetition."""
    results = [Result(r.name, build_s=r.build_s, note=r.note) for r in runners]
    data = [cycle(batches) for _ in runners]  # each runner its own position, same batches
    for i, r in enumerate(runners):
        for _ in range(warmup):
            results[i].last_loss = r.step(data[i])
    for rep in range(reps):
        for k in range(len(runners)):
            i = (rep + k) % len(runners)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                results[i].last_loss = runners[i].step(data[i])
            synchronize(device)
            results[i].tok_s.append(steps * tokens_per_step / (time.perf_counter() - t0))
    return results


def model_config(preset: str, seq_len: int | None, checkpointing: bool = False
                 ) -> tuple[ArgonneConfig, int]:
    """The preset, its context stretched to `seq_len` if that is longer; returns (config, T)."""
    config = load_model_config(preset)
    seq = seq_len or config.max_position_embeddings
    overrides: dict[str, Any] = {"use_gradient_checkpointing": checkpointing}
    if seq > config.max_position_embeddings:
        overrides["max_position_embeddings"] = seq
    return load_model_config(preset, **overrides), seq


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ---- CPU entry point --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (argonne_ds.config.PRESETS)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sample (default: the preset's max_position_embeddings)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (all modes alike)")
    p.add_argument("--modes", default="zero0,zero1,pipe",
                   help=f"comma list from {ENGINE_MODES}; the bare loop always runs")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per mode")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per repetition")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in ENGINE_MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {ENGINE_MODES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process("cpu", args.threads)
    device = torch.device("cpu")
    config, seq = model_config(args.preset, args.seq_len)
    tokens_per_step = args.micro_batch * args.grad_accum * seq
    batches = synthetic_batches(config.vocab_size, args.micro_batch, seq, 2 * args.grad_accum,
                                device)
    load_before = load_avg()
    runners: list[Runner] = [BareLoop(config, args.grad_accum, "fp32", device)]
    runners += [EngineRunner(m, config, ds_config(m, args.micro_batch, args.grad_accum), device)
                for m in args.modes]
    results = measure(runners, batches, tokens_per_step, args.warmup, args.reps, args.steps,
                      device)
    load_after = load_avg()
    for r in runners:
        r.close()

    import deepspeed

    n_params = count_parameters(config)["total"]
    print(f"\nengine_throughput | preset {args.preset} ({n_params / 1e6:.1f}M params) | fp32 | "
          f"micro {args.micro_batch} x accum {args.grad_accum} x seq {seq} = {tokens_per_step} "
          f"tokens/step | threads {torch.get_num_threads()} | torch {torch.__version__} | "
          f"deepspeed {deepspeed.__version__}")
    print(f"warm-up {args.warmup} steps, {args.reps} reps x {args.steps} steps per mode "
          f"(interleaved) | load avg 1/5/15 min: before {load_before}, after {load_after}")
    bare = results[0].median
    print(f"{'mode':<7}{'median tok/s':>14}{'min':>10}{'max':>10}{'ms/step':>10}"
          f"{'vs bare':>9}{'build s':>9}{'loss':>8}")
    for r in results:
        print(f"{r.name:<7}{r.median:>14,.0f}{min(r.tok_s):>10,.0f}{max(r.tok_s):>10,.0f}"
              f"{1000 * tokens_per_step / r.median:>10.1f}{r.median / bare:>9.3f}"
              f"{r.build_s:>9.2f}{r.last_loss:>8.3f}")
    print("optimizers: " + "; ".join(f"{r.name} = {r.note}" for r in results))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
