"""What every rank of an Engine calls alike: agreement between ranks (the same collectives in
the same order, whatever a rank holds) and the training-time greedy sample."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from argonne_ds.model.pipe import HeadPipe, pipeline_batches


class Collectives:
    """Mixed into Engine (engine.py): needs `device` and `world_size`."""

    device: torch.device
    world_size: int

    def any_rank(self, *flags: bool) -> list[bool]:
        """Each flag, true when it is true on any rank (so every rank takes the same branch)."""
        t = torch.tensor([float(f) for f in flags], device=self.device)  # NCCL: device tensors
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def all_ranks(self, flag: bool) -> bool:
        """True when `flag` is true on every rank."""
        return not self.any_rank(not flag)[0]

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (a decision one rank makes for all)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


class Sampling:
    """Mixed into Engine (engine.py): needs `engine`, `mode`, `model_config`, `module`."""

    engine: Any
    mode: str
    model_config: Any
    module: Any

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, stop_id: int | None = None
                 ) -> list[int]:
        """Greedy continuation of one prompt (a training-time sample; every rank must call it).
        No KV cache: a few dozen tokens of a sample are cheap next to a training step."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.engine.device)
        limit = self.model_config.max_position_embeddings
        self.engine.eval()
        for _ in range(max_new_tokens):
            window = ids[:, -limit:]
            if self.mode == "pipeline":
                self.engine.reset_activation_shape()  # the length changes every call
                head = self._stage_head()
                if head is not None:
                    head.return_logits = True
                try:
                    out = self.engine.eval_batch(pipeline_batches([(window, window)]),
                                                 return_logits=True, num_micro_batches=1)
                finally:
                    if head is not None:
                        head.return_logits = False
                self.engine.total_loss = None  # eval_batch leaves its loss accumulated
                nxt = torch.zeros(1, dtype=torch.long, device=self.engine.device)
                if self.engine.is_last_stage():
                    nxt[0] = out[1][0, -1].argmax()
                # Within this replica's pipeline: each data-parallel replica generates alike.
                grid = self.engine.grid
                dist.broadcast(nxt, src=grid.stage_to_global(self.engine.num_stages - 1),
                               group=grid.get_pipe_parallel_group())
            else:
                nxt = self.engine(window).logits[0, -1].argmax().reshape(1)
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if stop_id is not None and int(nxt) == stop_id:
                break
        if self.mode == "pipeline":
            self.engine.reset_activation_shape()
        self.engine.train()
        return ids[0, len(prompt):].tolist()

    def _stage_head(self) -> HeadPipe | None:
        """The output head, on the pipeline stage that holds it."""
        return next((m for m in self.module.modules() if isinstance(m, HeadPipe)), None)
