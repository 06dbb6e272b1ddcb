"""Peak host memory per rank when a job starts from a Hugging Face folder (`train --from-hf`).

Writes a random `--preset` model once as a bf16 safetensors folder (the way `argonne-ds export`
does), then starts `--ranks` gloo ranks that each build the engine from it — ZeRO-3 (rank 0 reads
one tensor at a time from the memory-mapped files) and a pipeline of `--ranks` stages (each stage
reads its own layers) — and prints every rank's peak RSS after the engine is ready, for the same
engine initialised from the seed and from the folder (the difference is what --from-hf costs),
beside the size of one fp32 copy of the model (what each rank held on top before, through
transformers' from_pretrained).

    python benchmarks/from_hf_memory.py --preset argonne2-1b --ranks 4 --work-dir /tmp/hfmem

CPU only; the model is never trained here (engine start-up only).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def ds_config(mode: str, ranks: int) -> dict:
    cfg = {"train_batch_size": ranks, "train_micro_batch_size_per_gpu": 1,
           "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    if mode == "zero3":  # buckets as in ds_configs/cpu_zero3.json (the defaults hold ~2 GB)
        cfg["zero_optimization"] = {"stage": 3, "reduce_bucket_size": 5_000_000,
                                    "stage3_prefetch_bucket_size": 5_000_000,
                                    "stage3_param_persistence_threshold": 10_000}
    else:
        cfg.update(pipeline={"stages": ranks, "partition_method": "parameters"},
                   zero_optimization={"stage": 1})
    return cfg


def start_engine(rank: int, world: int, folder: str, mode: str, source: str) -> dict:
    from argonne_ds.convert.export import hf_model_config, import_hf
    from argonne_ds.engine.engine import Engine

    t0 = time.perf_counter()
    config, state = import_hf(folder) if source == "hf" else (hf_model_config(folder), None)
    Engine(config, ds_config(mode, world), init_state=state)
    return {"rank": rank, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 2**20, "seconds": time.perf_counter() - t0}


def write_folder(preset: str, out: Path) -> float:
    """A random bf16 HF folder of `preset`; returns the fp32 size of the model in GiB."""
    import torch

    from argonne_ds.config import load_model_config
    from argonne_ds.convert.export import write_hf_folder
    from argonne_ds.model.model import ArgonneModel

    config = load_model_config(preset)
    if not (out / "config.json").is_file():
        print(f"[bench] writing a random {preset} to {out} (once)", flush=True)
        with torch.no_grad():
            model = ArgonneModel(config)
        write_hf_folder(model.state_dict(), config, out, dtype="bf16")
        del model
    from argonne_ds.model.model import count_parameters

    return count_parameters(config)["total"] * 4 / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="argonne2-1b")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--work-dir", default="/tmp/argonne-hfmem")
    p.add_argument("--modes", nargs="+", default=["zero3", "pipeline"])
    args = p.parse_args()
    from argonne_ds.testing import run_distributed_test

    folder = Path(args.work_dir) / Path(args.preset).stem
    fp32_gib = write_folder(args.preset, folder)
    print("| mode | weights from | ranks | peak RSS per rank (GiB) | start-up (s) | one fp32 "
          "copy (GiB) |\n|---|---|---|---|---|---|")
    for mode in args.modes:
        for source in ("seed", "hf"):  # the difference is what --from-hf costs
            results = run_distributed_test(start_engine, world_size=args.ranks,
                                           args=(str(folder), mode, source), timeout_s=3600)
            rss = " / ".join(f"{r['peak_rss_gib']:.2f}" for r in results)
            took = max(r["seconds"] for r in results)
            print(f"| {mode} | {'--from-hf' if source == 'hf' else 'the seed'} | {args.ranks} | "
                  f"{rss} | {took:.0f} | {fp32_gib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
