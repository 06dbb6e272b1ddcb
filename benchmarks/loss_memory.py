"""Peak host memory of the output head + loss, forward and backward: the plain path (the whole
(tokens, vocabulary) logits, their fp32 copy, cross-entropy) against model/loss.py's chunks.

    python benchmarks/loss_memory.py [--tokens 4096] [--vocab 151936] [--hidden 256]

Each variant runs in a fresh process; the figure is its peak RSS above what the inputs (hidden
states, head weight, their gradients' size) already hold. CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(variant: str, tokens: int, vocab: int, hidden: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from argonne_ds.model.loss import linear_cross_entropy
    from argonne_ds.model.model import causal_lm_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (1, tokens), generator=g)
    # The gradients' memory belongs to the inputs: allocate it before the baseline.
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "plain":
        loss = causal_lm_loss(F.linear(h, w), y)
    else:
        loss = linear_cross_entropy(h, w, y)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"loss": float(loss), "extra_gib": (peak - base) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--variant", choices=("plain", "chunked"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:  # one measurement, in this fresh process
        print(json.dumps(measure(args.variant, args.tokens, args.vocab, args.hidden)))
        return
    logits_gib = args.tokens * args.vocab * 4 / 2**30
    print(f"[bench] head + loss, forward and backward: {args.tokens} tokens, vocabulary "
          f"{args.vocab:,}, hidden {args.hidden}, fp32 (one fp32 copy of the logits: "
          f"{logits_gib:.2f} GiB)")
    got = {}
    for variant in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens",
                              str(args.tokens), "--vocab", str(args.vocab), "--hidden",
                              str(args.hidden)], capture_output=True, text=True, check=True)
        got[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {variant:8s} | peak above the inputs {got[variant]['extra_gib']:6.2f} GiB | "
              f"loss {got[variant]['loss']:.6f} |")
    print(f"chunked / plain: {got['chunked']['extra_gib'] / got['plain']['extra_gib']:.2f}")


if __name__ == "__main__":
    main()
