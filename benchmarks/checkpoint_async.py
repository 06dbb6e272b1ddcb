"""How long a save blocks the training loop, synchronous against in the background, and what a
write in flight costs the steps around it.

    python benchmarks/checkpoint_async.py [--sizes 9M 50M 150M 330M] [--ranks 2] [--steps 4]
        [--precision fp32] [--work-dir DIR]

For each model size, `--ranks` gloo ranks build `argonne_ds.engine.Engine` as a pipeline of
`--ranks` stages with ZeRO-1 (ds_configs/pipeline.json's layout) and train on random tokens
(micro-batch 1, block 128): `--steps` steps for the baseline step time, then

- a synchronous save: `Engine.save` + barrier (what the loop waited before; checkpoint_io.py
  measures the same call), then `os.sync`;
- a background save: `Engine.save` with checkpoint/writer.py's `BackgroundWriter` — the time the
  loop is blocked (the copy off the device) — then steps while the files are written (their
  mean step time against the baseline), until every rank's writer is idle (the write's span);
  twice, the second (reported) copying into the buffers of the first, as every save after a
  run's first does;
- the load (resume) of the background save's files.

Ratios printed: blocked (background) / synchronous save (goal <= 0.2) and step time while a
write is in flight / baseline (goal <= 1.1). Sizes shrink argonne2-1b (its width, fewer layers,
the vocabulary cut) to fit this machine's memory; bytes and seconds per parameter carry over.
Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
from checkpoint_io import ds_config  # noqa: E402

BLOCK = 128
SIZES = {  # name -> (preset, overrides)
    "9M": ("tiny", {}),
    "50M": ("argonne2-1b", {"num_hidden_layers": 1, "vocab_size": 4096}),
    "150M": ("argonne2-1b", {"num_hidden_layers": 2, "vocab_size": 16000}),
    "330M": ("argonne2-1b", {"num_hidden_layers": 4, "vocab_size": 32000}),
}


def measure(rank: int, world: int, preset: str, overrides: dict[str, int], precision: str,
            folder: str, n_steps: int) -> dict[str, Any]:
    import torch

    from argonne_ds.checkpoint.writer import BackgroundWriter
    from argonne_ds.config import load_model_config
    from argonne_ds.engine.engine import Engine

    config = load_model_config(preset, **overrides)
    ds = ds_config(world, precision)  # checkpoint_io.py's layout, two micro-batches a step
    ds["train_batch_size"] = 2
    engine = Engine(config, ds)
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            x = torch.randint(0, config.vocab_size, (1, BLOCK + 1), generator=gen)
            yield x[:, :-1], x[:, 1:]

    data = batches()

    def step() -> float:
        t0 = time.perf_counter()
        engine.train_step(data)
        return time.perf_counter() - t0

    step()  # warm-up (and Adam's state exists from here on)
    base = [step() for _ in range(n_steps)]
    engine.barrier()
    t0 = time.perf_counter()
    engine.save(folder, "sync", {"bench": True})
    engine.barrier()
    sync_s = time.perf_counter() - t0
    os.sync()
    writer = BackgroundWriter()
    for tag in ("async-first", "async"):  # the second save copies into the first's buffers
        engine.barrier()
        t0 = time.perf_counter()
        engine.save(folder, tag, {"bench": True}, writer=writer)
        blocked = time.perf_counter() - t0
        during = []
        while not engine.all_ranks(writer.idle()):
            during.append(step())
        write_s = time.perf_counter() - t0
    after = [step() for _ in range(n_steps)]
    engine.barrier()
    t0 = time.perf_counter()
    engine.load(folder, "async")
    engine.barrier()
    load_s = time.perf_counter() - t0
    return {"base": base, "during": during, "after": after, "sync_s": sync_s,
            "blocked_s": blocked, "write_s": write_s, "load_s": load_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--work-dir")
    args = ap.parse_args()

    from argonne_ds.config import load_model_config
    from argonne_ds.model.model import count_parameters
    from argonne_ds.testing import run_distributed_test

    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.ranks} gloo "
          f"ranks, pipeline ZeRO-1, {args.precision}, micro-batch 1 x {BLOCK} tokens")
    print("\n| params | checkpoint | sync save (loop blocked) | background: loop blocked | "
          "blocked / sync | write in flight | steps during | step time during / baseline | "
          "load |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.sizes:
        preset, overrides = SIZES[name]
        params = count_parameters(load_model_config(preset, **overrides))["total"]
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="argonne-async-")) / name
        work.mkdir(parents=True, exist_ok=True)
        try:
            r = run_distributed_test(measure, world_size=args.ranks, timeout_s=3600, args=(
                preset, overrides, args.precision, str(work), args.steps))
            size = sum(f.stat().st_size for f in (work / "async").rglob("*") if f.is_file())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        r0 = r[0]
        base = statistics.median(r0["base"] + r0["after"])
        during = statistics.mean(r0["during"]) if r0["during"] else float("nan")
        print(f"| {params / 1e6:,.0f} M | {size / 1e9:.2f} GB | {r0['sync_s']:.2f} s | "
              f"{r0['blocked_s']:.2f} s | {r0['blocked_s'] / r0['sync_s']:.2f} | "
              f"{r0['write_s']:.2f} s | {len(r0['during'])} | {during / base:.2f} "
              f"({during:.2f} / {base:.2f} s) | {r0['load_s']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
