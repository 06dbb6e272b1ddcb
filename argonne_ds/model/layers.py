"""The layers Argonne 2.0 is built of, in plain PyTorch: RMSNorm, rotary position embeddings,
the SwiGLU MLP, and the document bookkeeping of packed blocks (which document each token is in,
its position inside it, the attention restriction to it). Attention and the model: model.py.
Shapes: B batch, T time, C hidden, D head_dim."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from argonne_ds.config import ArgonneConfig


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the variance computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables. Holds no tensors: cos/sin are computed in fp32 on demand, so a
    bf16 cast of the model cannot degrade the frequencies and no buffer needs sharding."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(
        self, seq_len: int, device: torch.device, dtype: torch.dtype, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))  # (D/2,)
        pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_at(rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for explicit positions (B, T) -> (B, 1, T, D): left-padded batches, KV cache."""
    exponent = torch.arange(0, rotary.head_dim, 2, dtype=torch.int64,
                            device=positions.device).float()
    inv_freq = 1.0 / (rotary.theta ** (exponent / rotary.head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---- documents: a packed block holds several, each ended by the separator (data/stream.py) -----


def document_ids(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """(B, T) -> (B, T) int64: the document of its row each position belongs to, from 0. A
    document starts at position 0 and right after each separator; a separator belongs to the
    document it ends."""
    ends = (input_ids == separator_id).long()
    return ends.cumsum(-1) - ends  # separators strictly before t


def _document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a document begins."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) int64: each position's offset inside its document (0 at every start)."""
    t = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start_of_doc = torch.where(_document_starts(doc_ids), t, 0).cummax(dim=-1).values
    return t - start_of_doc


@dataclass(frozen=True)
class DocumentAttention:
    """Attention kept inside each document: the SDPA mask, or where flash-attn runs its varlen
    form (documents as separate sequences: no (T, T) mask, no work on pairs across documents).
    The plain model builds it once per forward for every block; a pipeline block from the
    document ids the stages pass on (pipe.py)."""

    mask: torch.Tensor | None = None  # (B, 1, T, T) bool: causal and same document (SDPA)
    cu_seqlens: torch.Tensor | None = None  # (N + 1,) int32: document starts in the B*T tokens
    max_seqlen: int = 0  # the longest document (flash-attn varlen)

    @classmethod
    def build(cls, doc_ids: torch.Tensor, flash: bool) -> DocumentAttention:
        B, T = doc_ids.shape
        if flash:
            # Documents never cross rows (every row starts one), so the flattened starts are
            # the cumulative lengths. max_seqlen costs one host sync per forward.
            starts = _document_starts(doc_ids).flatten().nonzero().flatten()
            cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
            return cls(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        return cls(mask=(same_doc & causal)[:, None])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); cos/sin: (T, D) or (B, 1, T, D), broadcast over batch and heads."""
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__()
        c, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(c, f, bias=False)
        self.up_proj = nn.Linear(c, f, bias=False)
        self.down_proj = nn.Linear(f, c, bias=False)
        self.down_proj.is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
