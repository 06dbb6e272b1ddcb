"""What document masking costs: forward + backward time of the plain model with the options off,
with document_masking, with document_positions and with both, on one packed batch.

    python benchmarks/document_masking.py [--preset tiny] [--seq 1024 2048] [--batch 1]
        [--vocab N] [--doc-len 300] [--repeats 5] [--threads 1]

Documents of about `--doc-len` tokens are packed into each row, separated by the separator (the
last vocabulary id here). The loss is the chunked one (labels given), fp32; the median of
`--repeats` timed steps after one warm-up is printed. Off CUDA the masked path is SDPA with a
(B, 1, T, T) boolean mask instead of `is_causal`; on CUDA with flash-attn it is the varlen
kernel, whose cost this script does not measure on a CPU machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from argonne_ds.config import load_model_config  # noqa: E402
from argonne_ds.model import ArgonneModel  # noqa: E402

MODES = {"off": {}, "masking": {"document_masking": True},
         "positions": {"document_positions": True},
         "both": {"document_masking": True, "document_positions": True}}


def packed_batch(batch: int, seq: int, vocab: int, doc_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab - 1, (batch, seq), generator=g)
    lengths = torch.randint(doc_len // 2, doc_len * 3 // 2, (batch, seq), generator=g)
    for row in range(batch):
        at = int(lengths[row, 0]) - 1
        i = 1
        while at < seq:
            x[row, at] = vocab - 1  # the separator ends a document
            at += int(lengths[row, i])
            i += 1
    return x


def step_seconds(model: ArgonneModel, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(x, labels=x).loss.backward()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--vocab", type=int, default=None,
                    help="override the preset's vocabulary (small: the blocks dominate)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--doc-len", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s), torch {torch.__version__}, preset {args.preset}, vocab "
          f"{args.vocab or 'preset'}, "
          f"batch {args.batch}, documents ~{args.doc_len} tokens, fp32, median of {args.repeats}")
    print("| T | " + " | ".join(f"{m} (s)" for m in MODES) + " | masking / off |")
    print("|---|" + "---|" * (len(MODES) + 1))
    for seq in args.seq:
        row = {}
        for mode, options in MODES.items():
            vocab = args.vocab or load_model_config(args.preset).vocab_size
            extra = {**options, "document_separator_id": vocab - 1} if options else {}
            config = load_model_config(args.preset, max_position_embeddings=seq,
                                       vocab_size=vocab, **extra)
            torch.manual_seed(0)
            model = ArgonneModel(config).train()
            x = packed_batch(args.batch, seq, config.vocab_size, args.doc_len)
            row[mode] = step_seconds(model, x, args.repeats)
        cells = " | ".join(f"{row[m]:.3f}" for m in MODES)
        print(f"| {seq} | {cells} | {row['masking'] / row['off']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
