"""How long a training checkpoint takes to save and to load, and how many bytes it is.

A launcher gives a job about 30 s between SIGTERM and SIGKILL (deepspeed's launch.py terminates,
waits 30 s, kills; Slurm's KillWait defaults to 30 s): a save on SIGTERM must fit in that.

    python benchmarks/checkpoint_io.py [--preset argonne2-1b] [--layers 4] [--vocab 32000]
        [--ranks 2] [--precision bf16] [--no-crc32] [--work-dir DIR]

Starts `--ranks` gloo ranks that build `argonne_ds.engine.Engine` as a pipeline of `--ranks`
stages with ZeRO-1 (the layout of ds_configs/pipeline.json; bf16 accumulates in fp32) and give
it Adam's state (zeros at step 1: the same files as after one real step). Then, all ranks at
once, barrier to barrier: `Engine.save` (DeepSpeed's save_checkpoint; torch.save does not fsync,
so the bytes may still sit in the page cache), `os.sync()` ("save+sync": they are on the disk,
or at least in the disk's or the VM host's cache, which a guest cannot see past), and
`Engine.load` twice: first after posix_fadvise(DONTNEED) dropped the files from the page cache
(as a resume in a fresh process on another node), then again (cached files, reused memory).
The full presets do not fit a 23 GiB CPU machine, so the defaults shrink argonne2-1b (4 layers,
a 32k vocabulary: 0.32 B parameters, 4.5 GB of state, peak RSS ~10 GiB over 2 ranks, ~1 min);
bytes/param and GB/s carry over, and a second table scales them to the full presets.
`--work-dir` picks the filesystem measured (default: a temporary folder, removed at the end)."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TAG = "bench"
GRACE_S = 30.0
GPUS_PER_NODE = 8


def ds_config(stages: int, precision: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "pipeline": {"stages": stages, "partition_method": "parameters"},
        "zero_optimization": {"stage": 1}}
    if precision == "bf16":
        cfg.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    return cfg


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def drop_from_page_cache(folder: Path) -> None:
    """Clean pages only (after os.sync); a hint that Linux follows for files we can open."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def measure(rank: int, world: int, preset: str, overrides: dict[str, int], precision: str,
            folder: str, crc32: bool) -> dict[str, Any]:
    """One rank: build, save, sync, load twice; seconds from barrier to barrier (all ranks)."""
    import torch

    from argonne_ds.config import load_model_config
    from argonne_ds.engine.engine import Engine
    from argonne_ds.engine.state import create_adam_state

    torch.serialization.set_crc32_options(crc32)
    engine = Engine(load_model_config(preset, **overrides), ds_config(world, precision))
    create_adam_state(engine.engine.optimizer, 1)
    rss = {"built": peak_rss_gib()}
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        engine.barrier()
        t0 = time.perf_counter()
        fn()
        engine.barrier()
        seconds[name] = time.perf_counter() - t0
        rss[name] = peak_rss_gib()

    timed("save", lambda: engine.save(folder, TAG, {"bench": True}))
    timed("sync", os.sync)  # every rank: none waits in a barrier for another's sync
    if rank == 0:
        drop_from_page_cache(Path(folder) / TAG)
    timed("load", lambda: engine.load(folder, TAG))  # what a resume in a fresh process does
    timed("load again", lambda: engine.load(folder, TAG))  # from the page cache, memory reused
    return {"seconds": seconds, "rss": rss}


def file_groups(folder: Path) -> dict[str, int]:
    """Bytes by kind of file, to see what DeepSpeed writes besides the state itself."""
    groups: dict[str, int] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            kind = ("layer_*-model_states.pt" if path.name.startswith("layer_") else
                    "*optim_states.pt" if path.name.endswith("optim_states.pt") else
                    "mp_rank_*_model_states.pt" if path.name.endswith("model_states.pt") else
                    path.name)
            groups[kind] = groups.get(kind, 0) + path.stat().st_size
    return groups


def table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = [head, ["---"] * len(head), *body]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="argonne2-1b")
    p.add_argument("--layers", type=int, default=4, help="num_hidden_layers override (0: preset)")
    p.add_argument("--vocab", type=int, default=32_000, help="vocab_size override (0: preset)")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks = pipeline stages")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--no-crc32", action="store_true",
                   help="torch.save without its per-record CRC32 (CPU-bound; on by default)")
    p.add_argument("--work-dir", help="where to write (default: a temporary folder, removed)")
    args = p.parse_args()
    from argonne_ds.config import load_model_config
    from argonne_ds.model.model import count_parameters
    from argonne_ds.testing import run_distributed_test

    overrides = {k: v for k, v in (("num_hidden_layers", args.layers),
                                   ("vocab_size", args.vocab)) if v}
    params = count_parameters(load_model_config(args.preset, **overrides))["total"]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="argonne-ckpt-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {args.preset} {overrides}: {params / 1e9:.3f} B params, {args.ranks} ranks, "
          f"{args.precision}, pipeline ZeRO-1, writing to {work}", flush=True)
    load_before = os.getloadavg()[0]  # the machine's other work slows every figure here
    try:
        results = run_distributed_test(measure, world_size=args.ranks, timeout_s=3600, args=(
            args.preset, overrides, args.precision, str(work), not args.no_crc32))
        groups = file_groups(work / TAG)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    size = sum(groups.values())
    sec = results[0]["seconds"]  # barrier to barrier: the same span on every rank
    spans = {"save": sec["save"], "save+sync": sec["save"] + sec["sync"],
             "load (first, cold)": sec["load"], "load again (cached)": sec["load again"]}
    peaks = [max(r["rss"].values()) for r in results]
    rows = [["figure", "value"],
            ["model", f"{args.preset} {overrides}, {params:,} params"],
            ["layout", f"{args.precision}, pipeline of {args.ranks} stage(s), ZeRO-1, gloo "
                       f"(CPU), torch.save CRC32 {'off' if args.no_crc32 else 'on'}"],
            ["state GB on disk", f"{size / 1e9:.2f}"],
            ["state bytes/param", f"{size / params:.2f}"],
            *[[f"  {kind} GB", f"{n / 1e9:.3f}"] for kind, n in sorted(groups.items())],
            *[[f"{k} s", f"{v:.1f}"] for k, v in spans.items()],
            *[[f"{k} GB/s (per rank)", f"{size / v / 1e9:.2f} ({size / v / args.ranks / 1e9:.2f})"]
              for k, v in spans.items()],
            ["peak RSS GiB per rank", " / ".join(f"{g:.2f}" for g in peaks)],
            ["peak RSS GiB, ranks summed", f"{sum(peaks):.2f}"],
            ["load average, before / after", f"{load_before:.2f} / {os.getloadavg()[0]:.2f} "
                                             f"({os.cpu_count()} CPUs)"]]
    print(table(rows))

    rate = size / spans["save+sync"]  # this machine's, all its ranks writing at once
    print(f"\nScaled to the full presets at {size / params:.2f} bytes/param ({args.precision}) "
          f"and the save+sync rate above, the state split evenly over the ranks (pipeline "
          f"stages and ZeRO), {GPUS_PER_NODE} GPUs a node. 'node' assumes one node writes at "
          f"this machine's total rate ({rate / 1e9:.2f} GB/s); 'ranks' that every rank keeps "
          f"this machine's per-rank rate ({rate / args.ranks / 1e9:.2f} GB/s; each rank "
          "serialises on its own core) and the storage keeps up. A parallel filesystem shares its "
          "bandwidth between nodes and differs from a local disk either way.")
    rows = [["model", "GPUs", "ckpt GB", "GB per rank", "GB per node", "s (node)", "s (ranks)",
             f"node GB/s for {GRACE_S:.0f} s", f"within {GRACE_S:.0f} s?"]]
    for preset in ("argonne2-1b", "argonne2"):
        total = count_parameters(load_model_config(preset))["total"] * size / params
        for gpus in (GPUS_PER_NODE, 64):
            node = total / (gpus // GPUS_PER_NODE)
            by_node, by_ranks = node / rate, total / gpus / (rate / args.ranks)
            fits = ("yes" if max(by_node, by_ranks) <= GRACE_S else
                    "if storage keeps up" if by_ranks <= GRACE_S else "no")
            rows.append([preset, str(gpus), f"{total / 1e9:.1f}", f"{total / gpus / 1e9:.2f}",
                         f"{node / 1e9:.1f}", f"{by_node:.0f}", f"{by_ranks:.0f}",
                         f"{node / GRACE_S / 1e9:.2f}", fits])
    print(table(rows))


if __name__ == "__main__":
    main()
