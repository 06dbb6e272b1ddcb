"""`argonne-ds eval`: loss and perplexity of a model on held-out shards, token-weighted over
packed blocks read exactly as training reads them, and the loss by position (after a context
extension: does the loss past the old context fall?)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from argonne_ds.data.loader import build_data_iterator
from argonne_ds.model.loss import position_buckets
from argonne_ds.model.model import ArgonneModel
from argonne_ds.run_config import DataConfig


@torch.no_grad()
def evaluate(model: ArgonneModel, data: DataConfig, batch_size: int = 8,
             max_batches: int | None = None, show_progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    it, _ = build_data_iterator(data, global_batch_size=batch_size, micro_batch_size=batch_size,
                                model_vocab_size=model.config.vocab_size,
                                show_progress=show_progress)
    total_loss, tokens, done, t0 = 0.0, 0, 0, time.perf_counter()
    pos_sum = torch.zeros(data.block_size, dtype=torch.float64)
    pos_n = torch.zeros(data.block_size, dtype=torch.float64)
    bar = tqdm(desc="eval", unit="block", disable=not show_progress, total=it.blocks_per_epoch)
    while max_batches is None or done < max_batches:
        first = it.samples
        x, y = next(it)
        n = it.blocks_per_epoch  # known up front from the cache; streaming learns it at the end
        if n is not None and first >= n:
            break
        if n is not None and it.samples > n:  # wrapped into the next epoch: drop those blocks
            x, y = x[:n - first], y[:n - first]
        # Each position's loss, a chunk of the head at a time (model/loss.py): never the
        # whole (B, T, V) logits.
        device = model.lm_head.weight.device
        losses = model(x.to(device), labels=y.to(device), per_token=True).loss.double().cpu()
        valid = (y != -100).double()
        pos_sum += (losses * valid).sum(0)
        pos_n += valid.sum(0)
        total_loss += float((losses * valid).sum())
        tokens += int(valid.sum())
        done += 1
        bar.update(len(x))
        if n is not None and it.samples >= n:
            break
    bar.close()
    if was_training:
        model.train()
    loss = total_loss / max(1, tokens)
    elapsed = time.perf_counter() - t0
    by_position = {f"{a}-{b - 1}": float(pos_sum[a:b].sum() / max(float(pos_n[a:b].sum()), 1))
                   for a, b in position_buckets(data.block_size)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens,
            "by_position": by_position,
            "blocks": tokens // data.block_size, "tokens_per_s": tokens / elapsed,
            "block_size": data.block_size, "device": str(model.lm_head.weight.device),
            "dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}
