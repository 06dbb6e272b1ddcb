"""GPU throughput: tokens/s and MFU of a preset (default `argonne2-1b`, bf16, 4096 tokens per
sample) trained through `argonne_ds.engine.Engine` in three modes, against a bare PyTorch bf16
loop of the same model, in one run of this script.

Modes, one after the other, each in a fresh child process (so that memory or state one engine
leaves behind cannot slow or OOM the next, and a crash or hang costs one row, not the table):
    bare    ArgonneModel in bf16 + fp32 master weights + fused torch AdamW + clipping
            (the arithmetic of DeepSpeed's bf16 modes, without DeepSpeed)
    pipe    Engine, a one-stage PipelineModule, bf16, ZeRO-1 (train_batch)
    zero1   Engine, data parallel on one GPU, bf16, ZeRO-1
    zero3   Engine, ZeRO-3 on one GPU (model built under zero.Init), bf16
The optimizer is torch.optim.AdamW(fused=True) everywhere ("torch_adam": true, "fused": true in
the DeepSpeed JSON: no FusedAdam JIT build). Synthetic random tokens (throughput only).
Per mode: `--warmup` untimed steps, then `--reps` repetitions of `--steps` optimizer steps;
reported: median tokens/s, model TFLOP/s (argonne_ds.metrics.flops_per_token: 6N + attention,
no recompute counted), MFU against the datasheet dense bf16 peak (989 TFLOP/s on H100/H200;
`--peak-tflops` to override), the ratio to the bare loop (targets: MFU >= 45%,
engine/bare >= 0.95) and the peak allocated memory. A mode that fails (OOM, error) gets an
error row; the table is printed last whatever happens, with the card's name.

Run on one GPU (no launcher needed; ~3-5 minutes with the defaults, `--budget-s` caps it):
    python benchmarks/gpu_throughput.py
    python benchmarks/gpu_throughput.py --seq-len 4096 --micro-batch 1 --grad-accum 8 \
        --activation-checkpointing --modes pipe,zero1,zero3
Everything of issue 10 at once (compile, document masking, DeepSpeed's FusedAdam beside torch's):
    python benchmarks/gpu_throughput.py --compile --document-masking --deepspeed-adam
On a machine without DeepSpeed, see docs/benchmarks.md for the wheels and the install line.
CPU check of the same code with the tiny preset (what `--dry-run` selects):
    python benchmarks/gpu_throughput.py --dry-run
    python benchmarks/gpu_throughput.py --device cpu --preset tiny --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch
from engine_throughput import (
    ENGINE_MODES,
    BareLoop,
    EngineRunner,
    Result,
    Runner,
    ds_config,
    load_avg,
    measure,
    model_config,
    prepare_process,
    release,
    synthetic_batches,
)

from argonne_ds.config import ArgonneConfig
from argonne_ds.metrics import flops_per_token, peak_tflops
from argonne_ds.model.memory import plan as memory_plan
from argonne_ds.model.model import count_parameters

# What --dry-run fills in where the flag was not given.
DRY_RUN = {"device": "cpu", "preset": "tiny", "seq_len": 64, "micro_batch": 2, "grad_accum": 2,
           "warmup": 1, "reps": 2, "steps": 1}
DEFAULTS = {"device": "cuda", "preset": "argonne2-1b", "seq_len": 4096, "micro_batch": 1,
            "grad_accum": 8, "warmup": 2, "reps": 3, "steps": 3}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda")
    p.add_argument("--preset", default=None, help="model preset; default argonne2-1b")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample; default 4096")
    p.add_argument("--micro-batch", type=int, default=None, help="default 1")
    p.add_argument("--grad-accum", type=int, default=None, help="default 8")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward (all modes, bare included)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--compile", action="store_true",
                   help='torch.compile every block (the JSON\'s "torch_compile"; bare too)')
    p.add_argument("--document-masking", action="store_true",
                   help="attention within documents (a separator every ~1,024 tokens)")
    p.add_argument("--deepspeed-adam", action="store_true",
                   help="add a zero1 row with DeepSpeed's FusedAdam (JIT-built, needs nvcc) "
                        "beside torch's fused AdamW")
    p.add_argument("--modes", default="pipe,zero1,zero3",
                   help=f"comma list from {ENGINE_MODES}; the bare loop always runs first")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode; default 2")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions; default 3")
    p.add_argument("--steps", type=int, default=None, help="steps per repetition; default 3")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator; default the datasheet figure for the card")
    p.add_argument("--threads", type=int, default=2, help="torch threads with --device cpu")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="modes not started by then are skipped (the table still prints)")
    p.add_argument("--mode-timeout-s", type=float, default=180.0,
                   help="a mode's process still running after this is killed (error row)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny preset, a few short steps: checks the script, not the GPU")
    p.add_argument("--only", choices=("bare", *ENGINE_MODES), help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)  # --only: where the child writes
    args = p.parse_args(argv)
    fill = {**DEFAULTS, **DRY_RUN} if args.dry_run else DEFAULTS
    for key, value in fill.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = [m for m in args.modes.split(",") if m]
    if args.deepspeed_adam and "zero1+dsadam" not in args.modes:
        args.modes.append("zero1+dsadam")
    bad = [m for m in args.modes if m.partition("+")[0] not in ENGINE_MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {ENGINE_MODES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU; use --dry-run (or --device cpu) here")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.processor())
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def bench_config(args: argparse.Namespace) -> tuple[ArgonneConfig, int]:
    config, seq = model_config(args.preset, args.seq_len, args.activation_checkpointing)
    if args.document_masking:
        config.document_masking, config.document_separator_id = True, 0
    return config, seq


def planned_gib(mode: str, args: argparse.Namespace, config: ArgonneConfig, seq: int
                ) -> float | None:
    """model/memory.py's plan for this mode on one GPU, without the fixed runtime reserve
    (torch's max_memory_allocated does not see the CUDA context or NCCL)."""
    if mode == "bare":
        return None
    ds = ds_config(mode.partition("+")[0], args.micro_batch, args.grad_accum, args.precision)
    if args.activation_checkpointing:
        ds["activation_checkpointing"] = {}
        if "pipeline" in ds:
            ds["pipeline"]["activation_checkpoint_interval"] = 1
    plans = memory_plan(config, ds, 1, seq)
    return max(p.total - p.reserve for p in plans)


def run_mode(mode: str, args: argparse.Namespace, device: torch.device) -> Result:
    """Build one runner, time it, free it. Errors (an OOM above all) become an error row."""
    config, seq = bench_config(args)
    batches = synthetic_batches(config.vocab_size, args.micro_batch, seq, 2 * args.grad_accum,
                                device, separator=config.document_separator_id)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner: Runner | None = None
    try:
        if mode == "bare":
            runner = BareLoop(config, args.grad_accum, args.precision, device,
                              compile=args.compile)
        else:
            ds_mode, _, adam = mode.partition("+")
            cfg = ds_config(ds_mode, args.micro_batch, args.grad_accum, args.precision,
                            compile=args.compile, deepspeed_adam=adam == "dsadam")
            runner = EngineRunner(mode, config, cfg, device)
        result = measure([runner], batches, args.micro_batch * args.grad_accum * seq,
                         args.warmup, args.reps, args.steps, device)[0]
    except Exception as e:  # noqa: BLE001 - one failing mode must not cost the others' figures
        traceback.print_exc()
        result = Result(mode, error=f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
                        if str(e) else type(e).__name__)
    finally:
        if runner is not None:
            try:
                runner.close()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        del runner, batches
        release(device)
    if device.type == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def child_argv(args: argparse.Namespace, mode: str, result_file: Path) -> list[str]:
    """The resolved settings, spelled out for a child process that runs one mode."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--only", mode,
            "--result-file", str(result_file), "--device", args.device,
            "--preset", args.preset, "--precision", args.precision, "--threads", str(args.threads)]
    for flag in ("seq_len", "micro_batch", "grad_accum", "warmup", "reps", "steps"):
        argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for flag in ("activation_checkpointing", "compile", "document_masking"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def run_isolated(mode: str, args: argparse.Namespace, timeout_s: float) -> Result:
    """One mode in a fresh process: nothing one engine leaves behind (GPU memory, DeepSpeed's
    globals) can slow or OOM the next, and a crash or hang costs one row, not the table."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        try:
            proc = subprocess.run(child_argv(args, mode, out), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return Result(mode, error=f"killed after --mode-timeout-s {timeout_s:.0f}")
        if out.is_file():
            return Result(**json.loads(out.read_text()))
        return Result(mode, error=f"process exited with code {proc.returncode}, no result")


def child_main(args: argparse.Namespace) -> int:
    prepare_process(args.device, args.threads if args.device == "cpu" else None)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    result = run_mode(args.only, args, device)
    Path(args.result_file).write_text(json.dumps(asdict(result)))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.only:
        return child_main(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # for the header line; each child sets its own
    config, seq = bench_config(args)
    tokens_per_step = args.micro_batch * args.grad_accum * seq
    flops_tok = flops_per_token(config, seq)
    load_before = load_avg()

    start = time.perf_counter()
    results: list[Result] = []
    for mode in ["bare", *args.modes]:
        if time.perf_counter() - start > args.budget_s:
            results.append(Result(mode, error=f"skipped: past --budget-s {args.budget_s:.0f}"))
            continue
        results.append(run_isolated(mode, args, args.mode_timeout_s))
        r = results[-1]
        print(f"[gpu_throughput] {mode}: "
              + (r.error or f"{r.median:,.0f} tok/s, loss {r.last_loss:.3f}, "
                 f"build {r.build_s:.1f} s, {r.note}")
              + f" ({time.perf_counter() - start:.0f} s elapsed)", flush=True)

    # Only now touch the GPU from this process (the children had it to themselves).
    name = device_name(torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu"))
    peak = peak_tflops(name, args.peak_tflops) if args.device == "cuda" or args.peak_tflops \
        else None
    n_params = count_parameters(config)["total"]
    bare = results[0].median if results[0].tok_s else float("nan")
    print(f"\ngpu_throughput | {name} | preset {args.preset} ({n_params / 1e9:.2f}B params) | "
          f"{args.precision} | micro {args.micro_batch} x accum {args.grad_accum} x seq {seq} = "
          f"{tokens_per_step} tokens/step | activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'} | torch.compile "
          f"{'on' if args.compile else 'off'} | document masking "
          f"{'on' if args.document_masking else 'off'}")
    print(f"torch {torch.__version__} | deepspeed {version('deepspeed')} | warm-up "
          f"{args.warmup}, {args.reps} reps x {args.steps} steps per mode, each mode in its own "
          f"process | {flops_tok / 1e9:.2f} GFLOP/token | peak "
          f"{f'{peak:.0f} TFLOP/s (datasheet)' if peak else 'unknown (no MFU)'} | "
          f"load avg before {load_before}, after {load_avg()}")
    print(f"{'mode':<13}{'tok/s':>10}{'spread':>8}{'TFLOP/s':>9}{'MFU':>7}{'vs bare':>9}"
          f"{'peak GiB':>9}{'plan GiB':>9}{'build s':>8}{'loss':>8}")
    for r in results:
        if r.error:
            print(f"{r.name:<13}  {r.error}")
            continue
        planned = planned_gib(r.name, args, config, seq)
        spread = (max(r.tok_s) - min(r.tok_s)) / r.median
        tflops = r.median * flops_tok / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        mem = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "-"
        plan_s = f"{planned:.1f}" if planned is not None else "-"
        print(f"{r.name:<13}{r.median:>10,.0f}{100 * spread:>7.1f}%{tflops:>9.2f}{mfu:>7}"
              f"{r.median / bare:>9.3f}{mem:>9}{plan_s:>9}{r.build_s:>8.1f}{r.last_loss:>8.3f}")
    print("targets: MFU >= 45% of the datasheet peak, engine/bare >= 0.95 "
          "(spread = (max - min) / median over the repetitions; plan = model/memory.py for "
          "the mode without its fixed reserve, against torch's peak allocation)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
