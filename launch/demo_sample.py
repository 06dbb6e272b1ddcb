"""Demo (until the training issue lands): trains the `tiny` preset with a plain PyTorch loop on the
embedded sample corpus (data/sample, real text), through the real data path: natural-order
discovery, a byte-level BPE trained on the data (fallback tokenizer), the token cache, packed
blocks and the resumable shard iterator. Half-way it saves the iterator state, rebuilds the
iterator from scratch and checks it continues exactly. No DeepSpeed yet.

    python launch/demo_sample.py [--steps 120]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from argonne_ds.config import load_model_config
from argonne_ds.data.loader import DataConfig, build_data_iterator
from argonne_ds.model import ArgonneModel, count_parameters

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--cache-dir", default=str(ROOT / ".argonne_cache" / "sample"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")

    config = load_model_config("tiny")
    data = DataConfig([str(ROOT / "data" / "sample" / "*.parquet")], cache_dir=args.cache_dir,
                      block_size=args.block_size, shuffle_window=256,
                      fallback_vocab_size=config.vocab_size)

    def iterator():
        return build_data_iterator(data, global_batch_size=args.batch_size,
                                   micro_batch_size=args.batch_size,
                                   model_vocab_size=config.vocab_size)

    it, tok = iterator()
    torch.manual_seed(0)
    model = ArgonneModel(config)
    print(f"[demo] tiny preset ({count_parameters(config)['total'] / 1e6:.1f}M parameters), "
          f"tokenizer {tok.path} ({tok.vocab_size:,} ids), {it.source.n_epoch:,} blocks of "
          f"{args.block_size}+1 tokens per epoch; plain PyTorch on CPU")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    t0, first, last = time.time(), math.nan, math.nan
    for step in range(1, args.steps + 1):
        if step == args.steps // 2:  # a restart: rebuild the iterator, load its state
            state = it.state_dict()
            it, _ = iterator()
            it.load_state_dict(state)
            print(f"[demo] restarted the data iterator at sample {state['samples']:,}")
        x, y = next(it)
        loss = model(x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if step == 1 else first
        last = loss.item()
        if step == 1 or step % 20 == 0:
            tok_s = step * x.numel() / (time.time() - t0)
            print(f"[demo] step {step:4d}/{args.steps}  loss {last:.3f}  {tok_s:,.0f} tok/s  "
                  f"samples {it.samples:,}  epoch {it.epoch}")
    print(f"[demo] loss {first:.2f} -> {last:.2f} in {time.time() - t0:.0f} s")
    if not last < 0.75 * first:
        raise SystemExit("[demo] the loss did not fall: something is wrong")


if __name__ == "__main__":
    main()
