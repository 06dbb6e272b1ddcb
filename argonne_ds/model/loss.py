"""The output head and the loss without the whole (tokens, vocabulary) logits.

`linear_cross_entropy(hidden, weight, labels)` is `cross_entropy((hidden @ weight.T).float(),
labels)` (mean over labels != -100) computed `CHUNK_TOKENS` tokens at a time: the forward keeps
only each token's log-sum-exp, the backward recomputes one chunk's logits at a time and turns them
into the gradients of `hidden` and `weight` (one extra head matmul per chunk; the weight's gradient
summed in fp32). At a vocabulary of 151,936 the plain path holds the logits, their fp32 copy and
the softmax's gradient (~2.4 GB per 1,000 tokens); this holds one chunk's.
"""

from __future__ import annotations

import os

import torch

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024

try:  # optional extra `[liger]`: Triton kernels, CUDA only
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss as _LigerLoss,
    )
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _LigerLoss = None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor,
                weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        h, y = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
        valid = y != IGNORE_INDEX
        lse = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), chunk):
            logits = (h[s:s + chunk] @ weight.t()).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, y[s:s + chunk].clamp(min=0)[:, None])[:, 0]
            total += ((lse[s:s + chunk] - picked) * valid[s:s + chunk]).sum()
            del logits, picked  # else the next chunk's logits are made beside these
        count = valid.sum()
        ctx.save_for_backward(h, weight, y, lse, count)
        ctx.chunk, ctx.shape = chunk, hidden.shape
        return total / count

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        h, weight, y, lse, count = ctx.saved_tensors
        scale = grad.float() / count
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if ctx.needs_input_grad[1] else None)
        for s in range(0, h.size(0), ctx.chunk):
            hc, yc = h[s:s + ctx.chunk], y[s:s + ctx.chunk]
            # d loss / d logits = (softmax - onehot) / count, zero on ignored tokens
            g = torch.exp((hc @ weight.t()).float() - lse[s:s + ctx.chunk, None])
            rows = torch.arange(len(yc), device=yc.device)
            g[rows, yc.clamp(min=0)] -= 1.0
            g *= ((yc != IGNORE_INDEX) * scale)[:, None]
            g = g.to(h.dtype)
            if grad_h is not None:
                grad_h[s:s + ctx.chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ hc).float()
            del g  # else the next chunk's logits are made beside this chunk's gradient
        return (None if grad_h is None else grad_h.reshape(ctx.shape),
                None if grad_w is None else grad_w.to(weight.dtype), None, None)


def liger_usable(hidden: torch.Tensor) -> bool:
    """liger-kernel's fused linear cross-entropy: installed, on CUDA, not switched off."""
    return (_LigerLoss is not None and hidden.is_cuda
            and os.environ.get("ARGONNE_LIGER", "1") != "0")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """hidden (..., C), weight (V, C), labels (...) -> the mean cross-entropy of the logits
    `hidden @ weight.T` (in hidden's dtype, then fp32) over labels != -100. On CUDA with
    liger-kernel installed, its fused kernel (the same loss, chunked in Triton; ARGONNE_LIGER=0
    keeps this module's chunks)."""
    if liger_usable(hidden):
        loss_fn = _LigerLoss(ignore_index=IGNORE_INDEX)
        return loss_fn(weight, hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1))
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)


@torch.no_grad()
def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """hidden (B, T, C) -> each position's cross-entropy (B, T) in fp32, 0 where the label is
    -100; a chunk's logits at a time (evaluation: no gradient)."""
    h, y = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    out = torch.zeros(h.size(0), dtype=torch.float32, device=h.device)
    for s in range(0, h.size(0), chunk):
        logits = (h[s:s + chunk] @ weight.t()).float()
        yc = y[s:s + chunk]
        out[s:s + chunk] = torch.nn.functional.cross_entropy(
            logits, yc, ignore_index=IGNORE_INDEX, reduction="none")
    return out.reshape(labels.shape)


def position_buckets(T: int) -> list[tuple[int, int]]:
    """[0, T/8), [T/8, T/4), [T/4, T/2), [T/2, T): after a 4k -> 32k extension, the first is
    the old context and the rest what the extension added."""
    edges = sorted({0, T // 8, T // 4, T // 2, T})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class LMHead(torch.nn.Linear):
    """The output projection; with labels it returns the loss, computed in chunks (inside the
    module's forward, so ZeRO-3 gathers the weight for it as for the logits); with
    `per_token`, each position's loss (B, T) instead (evaluation)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        if per_token:
            return token_cross_entropy(x, self.weight, labels)
        return linear_cross_entropy(x, self.weight, labels)
