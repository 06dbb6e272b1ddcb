"""`argonne-ds eval`: loss and perplexity of a model on held-out shards, token-weighted over
packed blocks read exactly as training reads them."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from argonne_ds.data.loader import build_data_iterator
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
    bar = tqdm(desc="eval", unit="block", disable=not show_progress, total=it.blocks_per_epoch)
    while max_batches is None or done < max_batches:
        first = it.samples
        x, y = next(it)
        n = it.blocks_per_epoch  # known up front from the cache; streaming learns it at the end
        if n is not None and first >= n:
            break
        if n is not None and it.samples > n:  # wrapped into the next epoch: drop those blocks
            x, y = x[:n - first], y[:n - first]
        # The chunked head + loss (model/loss.py): never the whole (B, T, V) logits.
        device = model.lm_head.weight.device
        mean = model(x.to(device), labels=y.to(device)).loss
        total_loss += float(mean) * y.numel()
        tokens += y.numel()
        done += 1
        bar.update(len(x))
        if n is not None and it.samples >= n:
            break
    bar.close()
    if was_training:
        model.train()
    loss = total_loss / max(1, tokens)
    elapsed = time.perf_counter() - t0
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens,
            "blocks": tokens // data.block_size, "tokens_per_s": tokens / elapsed,
            "block_size": data.block_size, "device": str(model.lm_head.weight.device),
            "dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}
