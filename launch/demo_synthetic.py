"""STUB demo until the data and training issues land: trains the `tiny` preset with a plain PyTorch
loop on SYNTHETIC structured tokens (each sequence counts up from a random start by a random
stride, so the next token is predictable and the loss visibly falls). No DeepSpeed, no real text.

    python launch/demo_synthetic.py [--steps 120]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from argonne_ds.config import load_model_config
from argonne_ds.model import ArgonneModel, count_parameters


def synthetic_batch(g: torch.Generator, batch: int, seq: int, vocab: int) -> torch.Tensor:
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    stride = torch.randint(1, 8, (batch, 1), generator=g)
    return (start + stride * torch.arange(seq + 1)) % vocab  # (B, T+1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_model_config("tiny")
    model = ArgonneModel(config)
    n = count_parameters(config)
    print(f"[demo] STUB: tiny preset ({n['total'] / 1e6:.1f}M parameters), synthetic tokens, "
          f"plain PyTorch on CPU; real data and DeepSpeed arrive with the data/training issues")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    vocab = 512  # a slice of the vocab keeps the task learnable in a few hundred steps
    t0 = time.time()
    first = last = math.nan
    for step in range(1, args.steps + 1):
        block = synthetic_batch(g, args.batch_size, args.seq_len, vocab)
        loss = model(block[:, :-1], labels=block[:, 1:]).loss  # the one shift happens here
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if step == 1 else first
        last = loss.item()
        if step == 1 or step % 25 == 0:
            tok_s = step * args.batch_size * args.seq_len / (time.time() - t0)
            print(f"[demo] step {step:4d}/{args.steps}  loss {last:.3f}  {tok_s:,.0f} tok/s")
    print(f"[demo] loss {first:.2f} -> {last:.2f} in {time.time() - t0:.0f} s")
    if not last < 0.5 * first:
        raise SystemExit("[demo] the loss did not fall: something is wrong")


if __name__ == "__main__":
    main()
