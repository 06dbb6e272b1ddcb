"""The layers Argonne 2.0 is built of, in plain PyTorch: RMSNorm, rotary position embeddings,
the SwiGLU MLP, and the document bookkeeping of packed blocks (which document each token is in,
its position inside it, the attention restriction to it). Attention and the model: model.py.
Shapes: B batch, T time, C hidden, D head_dim."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    bf16 cast of the model cannot degrade the frequencies and no buffer needs sharding.

    The scaled variants (config.rope_parameters: linear, dynamic, yarn, llama3) take their
    frequencies and attention factor from transformers' own `ROPE_INIT_FUNCTIONS`, so an export
    reproduces them in stock Llama/Mistral exactly; `dynamic` recomputes them from the longest
    position in the call, as transformers does in its forward."""

    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.kind = config.rope_type
        self.config = config  # read by transformers' frequency functions

    def frequencies(self, device: torch.device, seq_len: int | None = None
                    ) -> tuple[torch.Tensor, float]:
        """(D/2,) fp32 inverse frequencies and the factor cos/sin are scaled by."""
        if self.kind == "default":
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
            return 1.0 / (self.theta ** (exponent / self.head_dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scale = ROPE_INIT_FUNCTIONS[self.kind](self.config, device, seq_len=seq_len)
        return inv_freq.to(device=device, dtype=torch.float32), float(scale)

    def at(self, positions: torch.Tensor, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (*positions.shape, D) for integer positions of any shape."""
        seq_len = None
        if self.kind == "dynamic" and positions.numel():
            seq_len = int(positions.max()) + 1  # one host sync, dynamic only
        inv_freq, scale = self.frequencies(positions.device, seq_len)
        freqs = positions.float()[..., None] * inv_freq  # (..., D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., D)
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self, seq_len: int, device: torch.device, dtype: torch.dtype, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) tables for positions offset .. offset + seq_len - 1."""
        pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        return self.at(pos, dtype)


def rotary_at(rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for explicit positions (B, T) -> (B, 1, T, D): left-padded batches, KV cache."""
    cos, sin = rotary.at(positions, dtype)
    return cos[:, None], sin[:, None]


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
    """down(silu(gate(x)) * up(x)). With config.mlp_tiles = n > 1 (training), in n pieces along
    the sequence, each under a non-reentrant checkpoint: backward recomputes one piece at a
    time, so the four F-wide activations are held for T/n positions at most, never for all T
    (ALST's TiledMLP, in plain PyTorch). The same numbers either way."""

    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__()
        c, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(c, f, bias=False)
        self.up_proj = nn.Linear(c, f, bias=False)
        self.down_proj = nn.Linear(f, c, bias=False)
        self.down_proj.is_residual_proj = True
        self.tiles = config.mlp_tiles

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles > 1 and torch.is_grad_enabled() and x.shape[1] >= self.tiles:
            return torch.cat([checkpoint(self._mlp, part, use_reentrant=False)
                              for part in x.chunk(self.tiles, dim=1)], dim=1)  # (B, T, C)
        return self._mlp(x)


def sequence_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  docs: DocumentAttention | None, dropout: float = 0.0) -> torch.Tensor:
    """The attention of whole sequences on some heads: q (B, T, h, D), k/v (B, T, k, D) ->
    (B, T, h, D), causal, inside each document with docs (its mask is of the whole sequence).
    The local part of sequence parallelism, between Ulysses' two all-to-alls."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    gqa = k.shape[1] != q.shape[1]
    if docs is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask, dropout_p=dropout,
                                           enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                           enable_gqa=gqa)
    return y.transpose(1, 2)

