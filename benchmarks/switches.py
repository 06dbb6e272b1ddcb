"""What each model switch costs in time: forward + backward of one micro-batch of a small model
on this machine's CPU, with the switch on against off (the memory each saves: model/memory.py's
plan, `argonne-ds model-info --ds-config`, and benchmarks/memory_plan.py).

    python benchmarks/switches.py [--hidden 256] [--layers 4] [--vocab 32000] [--seq 1024]

Rows: the chunked loss (model/loss.py) against the plain head + cross-entropy, activation
checkpointing, torch.compile of every block (inductor; its compile time printed apart),
document masking (a separator every ~256 tokens). CPU figures: on a GPU the balance differs
(compile and checkpointing above all); benchmarks/gpu_throughput.py measures them there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from argonne_ds.config import ArgonneConfig  # noqa: E402
from argonne_ds.model.model import ArgonneModel, causal_lm_loss, compile_blocks  # noqa: E402

SEP = 0


def step_time(model: ArgonneModel, x: torch.Tensor, y: torch.Tensor, chunked: bool,
              warmup: int, reps: int) -> tuple[float, float]:
    """(median seconds of forward + backward, seconds of the first call)."""
    times = []
    for _ in range(warmup + reps):
        t0 = time.perf_counter()
        loss = model(x, labels=y).loss if chunked else causal_lm_loss(model(x).logits, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:]), times[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.hidden // 64,
                num_key_value_heads=max(1, args.hidden // 256),
                head_dim=64, max_position_embeddings=args.seq, document_separator_id=SEP)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, args.vocab, (args.micro, args.seq), generator=g)
    docs = x.clone()
    docs[torch.rand(x.shape, generator=g) < 1 / 256] = SEP
    y = torch.randint(0, args.vocab, (args.micro, args.seq), generator=g)

    def model(**fields: object) -> ArgonneModel:
        torch.manual_seed(0)
        return ArgonneModel(ArgonneConfig(**base, **fields)).train()

    rows = [("baseline: chunked loss, keep activations, eager", model(), x, True, False),
            ("plain loss (whole logits)", model(), x, False, False),
            ("activation checkpointing", model(use_gradient_checkpointing=True), x, True, False),
            ("torch.compile per block", model(), x, True, True),
            ("document masking", model(document_masking=True), docs, True, False)]
    print(f"[switches] hidden {args.hidden}, {args.layers} layers, vocab {args.vocab:,}, "
          f"{args.micro} x {args.seq} tokens, fp32, {args.threads} threads, torch "
          f"{torch.__version__}")
    print("| switch | forward + backward s | vs baseline | first call s |\n|---|---|---|---|")
    baseline = None
    for name, m, inputs, chunked, compiled in rows:
        if compiled:
            compile_blocks(m, backend="inductor")
        t, first = step_time(m, inputs, y, chunked, warmup=2, reps=args.reps)
        baseline = baseline or t
        print(f"| {name} | {t:.3f} | {t / baseline:.2f}x | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
