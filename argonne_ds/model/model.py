"""Argonne 2.0 in plain single-device PyTorch: GQA + RoPE + RMSNorm + SwiGLU, untied head.

No DeepSpeed here: parallelism is applied from the outside (`pipe.py` for pipeline parallelism,
`deepspeed.zero.Init` for ZeRO-3). Shapes: B batch, T time, C hidden, H query heads, K key/value
heads, D head_dim, V vocab.

Labels are already aligned with the inputs (`labels[:, t]` is the target of position t): the data
pipeline makes the one and only shift (inputs = block[:-1], labels = block[1:]). The origin shifted
a second time inside the model, silently training on t+2; here the model never shifts.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.layers import (  # noqa: F401 - re-exported: model.X imports stay valid
    DocumentAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    _document_starts,
    apply_rotary,
    document_ids,
    document_positions,
    rotary_at,
    rotate_half,
    sequence_core,
)
from argonne_ds.model.loss import IGNORE_INDEX, LMHead

logger = logging.getLogger(__name__)

try:  # optional extra `[flash]`; builds only against CUDA
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure (missing, ABI mismatch) means "not available"
    _flash_attn_func = _flash_attn_varlen_func = None

_logged_backends: set[str] = set()


def _log_backend_once(backend: str, reason: str) -> None:
    if torch.compiler.is_compiling():  # a logging call would break the compiled graph
        return
    if backend not in _logged_backends:
        _logged_backends.add(backend)
        logger.info("attention backend: %s (%s)", backend, reason)


def flash_attention_usable(q: torch.Tensor, head_dim: int) -> tuple[bool, str]:
    """flash-attn 2 needs CUDA, fp16/bf16, and head_dim a multiple of 8 up to 256 (170 is not)."""
    if _flash_attn_func is None:
        return False, "flash-attn not importable"
    if not q.is_cuda:
        return False, "tensors not on CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"dtype {q.dtype} is not fp16/bf16"
    if head_dim % 8 != 0 or head_dim > 256:
        return False, f"head_dim {head_dim} unsupported by flash-attn"
    return True, "CUDA, half precision, supported head_dim"


def document_layout(doc_ids: torch.Tensor, x: torch.Tensor, config: ArgonneConfig
                    ) -> tuple[DocumentAttention | None, torch.Tensor | None]:
    """What the blocks take from the document ids (B, T), given the hidden states x (B, T, C):
    the attention restriction (document_masking) and the positions (document_positions), each
    None when its option is off."""
    docs = None
    if config.document_masking:
        flash = (config.use_flash_attention and _flash_attn_varlen_func is not None
                 and flash_attention_usable(x, config.head_dim)[0])
        docs = DocumentAttention.build(doc_ids, flash)
    positions = document_positions(doc_ids) if config.document_positions else None
    return docs, positions


class Attention(nn.Module):
    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        c = config.hidden_size
        self.q_proj = nn.Linear(c, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c, bias=False)
        self.o_proj.is_residual_proj = True  # scaled init, see ArgonneModel._init_weights
        self.dropout = config.attention_dropout
        self.use_flash = config.use_flash_attention
        # Set from outside for sequence parallelism (engine/sequence.py, DeepSpeed Ulysses):
        # (q, k, v (B, T/P, heads, D), batch dim, None, docs, dropout) -> (B, T/P, H, D), the
        # attention over the whole sequence computed on H/P heads per rank (sequence_core).
        self.sequence_attention: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[torch.Tensor] | None = None, mask: torch.Tensor | None = None,
                docs: DocumentAttention | None = None, sharded: bool = False) -> torch.Tensor:
        """cache: [k, v] of earlier positions, extended in place (generation); mask: (B, 1, T, S)
        bool, True = may attend (left padding); docs: attention kept inside each document.
        Training passes docs at most; `sharded`: x is this rank's part of the sequence."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if sharded and self.sequence_attention is not None:
            y = self.sequence_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        0, None, docs, self.dropout if self.training else 0.0)
            return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]  # (B, K, S, D): S = all positions so far
        dropout = self.dropout if self.training else 0.0
        if docs is not None and docs.cu_seqlens is not None:
            _log_backend_once("flash-attn varlen", "document masking on CUDA")
            # The B*T tokens as one ragged batch of documents, each causal on its own.
            y = _flash_attn_varlen_func(
                q.transpose(1, 2).reshape(B * T, self.n_heads, self.head_dim),
                k.transpose(1, 2).reshape(B * T, self.n_kv, self.head_dim),
                v.transpose(1, 2).reshape(B * T, self.n_kv, self.head_dim),
                docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen,
                dropout_p=dropout, causal=True)  # (B*T, H, D)
            return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))
        if docs is not None:
            _log_backend_once("sdpa + document mask", "document masking without flash-attn")
            mask = docs.mask
        if mask is not None:
            gqa = self.n_kv != self.n_heads
            if gqa and q.is_cuda:
                # CUDA's masked SDPA kernel (memory-efficient) takes no enable_gqa; with it torch
                # falls back to the math kernel and its (B, H, T, S) scores.
                k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                gqa = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               enable_gqa=gqa)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        usable, reason = flash_attention_usable(q, self.head_dim) if self.use_flash else (
            False, "disabled by config")
        if usable:
            _log_backend_once("flash-attn", reason)
            # flash-attn takes (B, T, heads, D) and handles GQA natively.
            y = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 dropout_p=dropout, causal=True)
            y = y.reshape(B, T, self.n_heads * self.head_dim)
        else:
            _log_backend_once("sdpa", reason)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                               enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, D)
            y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class ArgonneBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[torch.Tensor] | None = None, mask: torch.Tensor | None = None,
                docs: DocumentAttention | None = None, sharded: bool = False) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.input_norm(x), cos, sin, cache, mask, docs, sharded))
        return x + self.dropout(self.mlp(self.post_norm(x)))


def compile_blocks(model: nn.Module, **options: object) -> int:
    """torch.compile every transformer block's `forward` (torch.compile's `options`); returns
    how many. Per block rather than the whole model: all blocks share one compiled graph
    (parameters are graph inputs), the embedding, head and loss stay eager. The forward only,
    not the module call (nn.Module.compile): module hooks (ZeRO-3's gathers, test hooks) stay
    outside the graph instead of breaking it and recompiling at every block. Parameter names
    are unchanged."""
    blocks = [m for m in model.modules() if isinstance(m, ArgonneBlock)]
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    return len(blocks)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, in fp32. No shift: labels are pre-aligned."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@torch.no_grad()
def init_module(module: nn.Module, config: ArgonneConfig) -> None:
    """normal(0, initializer_range); residual projections (o_proj, down_proj) scaled down by
    1/sqrt(2 * layers) so the residual stream's variance stays O(1) with depth. Applied per module
    (non-recursive), by HF's post_init here and by the pipeline wrappers in pipe.py."""
    std = config.initializer_range
    if isinstance(module, nn.Linear):
        if getattr(module, "is_residual_proj", False):
            std = std / math.sqrt(2 * config.num_hidden_layers)
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one parameter, from the run's seed and the parameter's plain name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_value(module: nn.Module, name: str, shape: torch.Size, config: ArgonneConfig,
                  seed: int) -> torch.Tensor:
    """The initial value of parameter `name` (its plain-model name, e.g. `blocks.3.attn.q_proj.
    weight`) owned by `module`: init_module's distributions, drawn from a CPU generator seeded
    by (seed, name) alone. So a parameter starts the same whatever the layout builds around it
    (a pipeline of any stage count, ZeRO-3 partitions, one process), and no two blocks start
    alike (seeding every rank alike and drawing in build order gave stages equal weights)."""
    if isinstance(module, RMSNorm) or name.endswith(".bias"):
        return torch.ones(shape) if isinstance(module, RMSNorm) else torch.zeros(shape)
    std = config.initializer_range
    if getattr(module, "is_residual_proj", False):
        std = std / math.sqrt(2 * config.num_hidden_layers)
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_by_name(root: nn.Module, config: ArgonneConfig, seed: int,
                 plain_name: Callable[[str], str] = lambda n: n) -> None:
    """Set every parameter of `root` to `initial_value` (`plain_name` maps the names `root`
    uses, e.g. a pipeline stage's `"<layer>.<path>"`, to the plain model's)."""
    for prefix, module in root.named_modules():
        for local, p in module.named_parameters(recurse=False):
            name = plain_name(f"{prefix}.{local}" if prefix else local)
            p.copy_(initial_value(module, name, p.shape, config, seed))


class ArgonnePreTrainedModel(PreTrainedModel):
    config_class = ArgonneConfig
    base_model_prefix = "argonne"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArgonneBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        init_module(module, self.config)


class ArgonneModel(ArgonnePreTrainedModel):
    """Decoder-only causal LM. Parameter names are the original Argonne 2.0's."""

    def __init__(self, config: ArgonneConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.blocks = nn.ModuleList(ArgonneBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = config.use_gradient_checkpointing
        self.sequence_shard: tuple[int, int] | None = None  # (rank, size): engine/sequence.py
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: list[list[torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
        **_: object,
    ) -> CausalLMOutput:
        """input_ids (B, T) int64 -> logits (B, T, V); with labels (B, T), the loss instead (the
        head and cross-entropy in chunks, never the whole logits: model/loss.py); with
        `per_token` too, each position's loss (B, T) (evaluation, unsharded).
        Generation passes `cache` (one [k, v] list per block, filled in place) and
        `attention_mask` (B, S): 1 for real tokens of all S positions so far, 0 for left pads."""
        if cache is not None or attention_mask is not None:
            return self._forward_cached(input_ids, cache, attention_mask)
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings and self.config.rope_type != "dynamic":
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings}); raise it with a RoPE scaling "
                "(docs/model.md, RoPE scaling) or use rope_type dynamic to read past it"
            )
        # Sequence parallelism (engine/sequence.py): this rank computes positions lo..hi-1 of
        # each sequence; documents and the loss's token count are of the whole sequence.
        shard = self.sequence_shard if labels is not None and not per_token else None
        lo, hi = (0, T) if shard is None else (shard[0] * T // shard[1],
                                              (shard[0] + 1) * T // shard[1])
        x = self.embed_tokens(input_ids[:, lo:hi])  # (B, T', C)
        docs, positions = None, None
        if self.config.uses_document_ids:
            doc_ids = document_ids(input_ids, self.config.document_separator_id)  # (B, T)
            docs, positions = document_layout(doc_ids, x, self.config)
        if positions is None:
            cos, sin = self.rotary(hi - lo, x.device, x.dtype, offset=lo)  # (T', D) each
        else:
            cos, sin = rotary_at(self.rotary, positions[:, lo:hi], x.dtype)  # (B, 1, T', D)
        sharded = shard is not None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, docs=docs, sharded=sharded,
                               use_reentrant=False)
            else:
                x = block(x, cos, sin, docs=docs, sharded=sharded)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(self.norm(x)))  # (B, T, V)
        if shard is None:  # with per_token: each position's loss (B, T), for evaluation
            return CausalLMOutput(loss=self.lm_head(self.norm(x), labels, per_token))
        # This rank's share of the mean over the whole sequences, times P: averaged over the
        # group (as data parallelism averages every rank) it is the loss of SP = 1.
        mine, total = int((labels[:, lo:hi] != IGNORE_INDEX).sum()), int(
            (labels != IGNORE_INDEX).sum())
        if not mine:
            return CausalLMOutput(loss=x.sum() * 0.0)  # nothing to learn here; graph kept
        share = shard[1] * mine / total
        return CausalLMOutput(loss=self.lm_head(self.norm(x), labels[:, lo:hi]) * share)

    def _forward_cached(self, input_ids: torch.Tensor, cache: list[list[torch.Tensor]] | None,
                        attention_mask: torch.Tensor | None) -> CausalLMOutput:
        B, T = input_ids.shape
        if cache is None:
            cache = [[] for _ in self.blocks]
        past = cache[0][0].shape[2] if cache[0] else 0
        S = past + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        valid = attention_mask.bool()  # (B, S)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        query_at = torch.arange(past, S, device=input_ids.device)[:, None]  # (T, 1)
        causal = torch.arange(S, device=input_ids.device)[None, :] <= query_at  # (T, S)
        mask = causal[None, None] & valid[:, None, None, :]  # (B, 1, T, S)
        mask = mask | (torch.arange(S, device=input_ids.device)[None, :] == query_at)[None, None]
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_at(self.rotary, positions, x.dtype)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, cos, sin, layer_cache, mask)
        return CausalLMOutput(logits=self.lm_head(self.norm(x)))


def count_parameters(config: ArgonneConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no allocation), split embedding / non-embedding."""
    c, L = config.hidden_size, config.num_hidden_layers
    hd, f = config.head_dim, config.intermediate_size
    h, kv = config.num_attention_heads, config.num_key_value_heads
    attn = c * h * hd * 2 + c * kv * hd * 2
    block = attn + 3 * c * f + 2 * c
    embed = config.vocab_size * c
    head = 0 if config.tie_word_embeddings else config.vocab_size * c
    non_embedding = L * block + c
    return {
        "embedding": embed + head,
        "non_embedding": non_embedding,
        "total": embed + head + non_embedding,
        "per_block": block,
    }
