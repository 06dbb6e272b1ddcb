"""The memory plan (argonne_ds/model/memory.py) for the shipped GPU JSONs, and its check against
peaks measured on this machine's CPU for reduced shapes.

    python benchmarks/memory_plan.py [--gpus 8] [--gpu-memory 80] [--no-measure]

Part 1 prints `argonne-ds model-info --ds-config` for argonne2 and argonne2-1b with
ds_configs/{pipeline,zero3,zero3_offload}.json. Part 2 runs one forward + backward of reduced
models (fp32 and bf16, with and without activation checkpointing, the chunked loss and the plain
one) under torch's MemTracker and prints measured / planned (tests/test_memory_plan.py holds
each within 15 %).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name: (model fields, micro-batch, tokens per sample)
    "8k vocab": (dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                      intermediate_size=704, max_position_embeddings=1024), 2, 1024),
    "2k vocab, wide": (dict(vocab_size=2048, hidden_size=384, num_hidden_layers=3,
                            num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                            intermediate_size=1024, max_position_embeddings=2048), 4, 512),
    "32k vocab, long": (dict(vocab_size=32000, hidden_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             intermediate_size=384, max_position_embeddings=2048), 1, 2048),
}


def plans(gpus: int, gpu_gib: float) -> None:
    from argonne_ds.config import load_model_config
    from argonne_ds.engine.ds_config import read_ds_config
    from argonne_ds.model.memory import format_memory_report, memory_report

    for preset in ("argonne2", "argonne2-1b"):
        config = load_model_config(preset)
        for name in ("pipeline", "zero3", "zero3_offload"):
            ds = read_ds_config(ROOT / "ds_configs" / f"{name}.json")
            report = memory_report(config, ds, gpus, 4096, gpu_gib)
            print(format_memory_report(f"{preset} with {name}.json", report), "\n")


def validation() -> None:
    import torch

    from argonne_ds.config import ArgonneConfig
    from argonne_ds.model.memory import loss_path_bytes, step_activation_peak
    from argonne_ds.testing import measured_step_peak

    print(f"| shape | dtype | checkpointing | loss | measured MiB | planned MiB | planned / "
          f"measured |\n|---|---|---|---|---|---|---|  (torch {torch.__version__}, CPU)")
    for shape, (fields, micro, seq) in SHAPES.items():
        config = ArgonneConfig(**fields)
        for dtype in (torch.float32, torch.bfloat16):
            for ckpt in (False, True):
                for chunked in (True, False):
                    a, tokens = dtype.itemsize, micro * seq
                    got = measured_step_peak(config, micro, seq, dtype, ckpt, chunked)
                    want = step_activation_peak(config, config.num_hidden_layers, tokens, a,
                                                ckpt, loss_path_bytes(config, tokens, a,
                                                                      chunked))
                    print(f"| {shape} | {str(dtype)[6:]} | {'on' if ckpt else 'off'} | "
                          f"{'chunked' if chunked else 'plain'} | {got / 2**20:.1f} | "
                          f"{want / 2**20:.1f} | {want / got:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0)
    p.add_argument("--no-measure", action="store_true", help="only the plans")
    args = p.parse_args()
    plans(args.gpus, args.gpu_memory)
    if not args.no_measure:
        validation()


if __name__ == "__main__":
    main()
