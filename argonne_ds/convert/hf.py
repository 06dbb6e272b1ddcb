"""Argonne <-> stock Hugging Face architectures (Llama / Mistral): config and weight key maps.

Argonne 2.0 is the Llama network (pre-norm RMSNorm, GQA, rotate-half RoPE, SwiGLU, untied head).
Where hidden/heads is integral a `LlamaConfig` describes it; otherwise (the `argonne2` preset:
4096/24) transformers 5.x's LlamaConfig rejects the shape, so `MistralConfig` with
`sliding_window=None` is used: the same network, and its config accepts an explicit head_dim.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import LlamaConfig, MistralConfig, PretrainedConfig

from argonne_ds.config import ArgonneConfig

# (argonne regex, HF template). `{i}` is the block index.
_KEY_MAP: list[tuple[str, str]] = [
    (r"embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"blocks\.(\d+)\.attn\.(q|k|v|o)_proj\.weight", "model.layers.{0}.self_attn.{1}_proj.weight"),
    (r"blocks\.(\d+)\.input_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blocks\.(\d+)\.post_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "model.layers.{0}.mlp.{1}_proj.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
_REVERSE_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed_tokens.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", "blocks.{0}.attn.{1}_proj.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blocks.{0}.input_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blocks.{0}.post_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "blocks.{0}.mlp.{1}_proj.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, template in table:
        m = re.fullmatch(pattern, key)
        if m:
            return template.format(*m.groups())
    raise KeyError(f"no mapping for parameter {key!r}")


def argonne_to_hf_key(key: str) -> str:
    return _rename(key, _KEY_MAP)


def hf_to_argonne_key(key: str) -> str:
    return _rename(key, _REVERSE_MAP)


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {argonne_to_hf_key(k): v for k, v in state.items()}


def from_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # HF may carry non-persistent rotary buffers in old checkpoints; they hold no weights.
    return {hf_to_argonne_key(k): v for k, v in state.items() if "rotary_emb" not in k}


def hf_config(config: ArgonneConfig) -> PretrainedConfig:
    """The stock config describing the same network: Llama if hidden/heads is integral and equals
    head_dim, else Mistral with sliding_window=None."""
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_dropout=config.attention_dropout,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    if config.hidden_size == config.num_attention_heads * config.head_dim:
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    return MistralConfig(**common, sliding_window=None)
