"""What the memory plan (model/memory.py) is checked against: a step's measured peak on CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def measured_step_peak(config: Any, micro_batch: int, seq_len: int, dtype: torch.dtype,
                       checkpointing: bool, chunked: bool,
                       prepare: Callable[[Any], None] | None = None) -> int:
    """Peak bytes allocated by one forward + backward of the plain model beyond its weights and
    gradients (the gradients already allocated, as under accumulation), measured by torch's
    MemTracker (every tensor storage, any device): what model/memory.py's plan predicts.
    `chunked`: the loss through the model's labels (model/loss.py); else the whole logits and
    `causal_lm_loss`, as a pipeline's last stage computes it. `prepare(model)`: e.g. sequence
    parallelism attached (engine/sequence.py), inside a distributed worker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from argonne_ds.model.model import ArgonneModel, causal_lm_loss

    torch.manual_seed(0)
    model = ArgonneModel(config).to(dtype).train()
    model.gradient_checkpointing = checkpointing
    if prepare is not None:
        prepare(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=g)
    y = torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=g)

    def step() -> None:
        loss = (model(x, labels=y).loss if chunked
                else causal_lm_loss(model(x).logits, y))
        loss.backward()

    step()  # the gradients now exist
    state = sum(2 * p.numel() * p.element_size() for p in model.parameters())
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]) - state
