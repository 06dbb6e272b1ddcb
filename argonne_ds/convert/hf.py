"""Argonne <-> stock Hugging Face architectures (Llama / Mistral): config and weight key maps.

Argonne 2.0 is the Llama network (pre-norm RMSNorm, GQA, rotate-half RoPE, SwiGLU, untied head).
Where hidden/heads is integral a `LlamaConfig` describes it; otherwise (the `argonne2` preset:
4096/24) transformers 5.x's LlamaConfig rejects the shape, so `MistralConfig` with
`sliding_window=None` is used: the same network, and its config accepts an explicit head_dim.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def hf_config(config: ArgonneConfig, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> PretrainedConfig:
    """The stock config describing the same network: Llama if hidden/heads is integral and equals
    head_dim, else Mistral with sliding_window=None.

    bos_token_id is always None: training packs documents each followed by the separator and
    encodes without special tokens (data/tokenizer.py), so the model never saw a BOS. Passing
    None explicitly also keeps Llama's defaults (bos 1, eos 2; with the Qwen vocab `"` and `#`)
    out of config.json, where they would stop generation at every `#`."""
    common = dict(
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
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
        rope_parameters=dict(config.rope_parameters),
    )
    if config.hidden_size == config.num_attention_heads * config.head_dim:
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    return MistralConfig(**common, sliding_window=None)


# ---- special tokens of an export ----------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    """The ids an export writes into config.json and generation_config.json, and the token strings
    it writes into the copied tokenizer files (None: leave that entry as it is)."""

    eos_id: int | None = None
    pad_id: int | None = None
    eos_token: str | None = None
    pad_token: str | None = None


def _token_name(value: Any) -> str | None:
    # tokenizer files hold a special token as a string or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def export_special_tokens(tokenizer_dir: str | Path | None,
                          separator_id: int | None) -> SpecialTokens:
    """The special tokens for an export of a model trained with `separator_id` after every
    document (None: an old checkpoint that did not record it) and the tokenizer in
    `tokenizer_dir` (None: no tokenizer folder). Reads local files only."""
    if tokenizer_dir is None:
        return SpecialTokens(eos_id=separator_id, pad_id=separator_id)
    from tokenizers import Tokenizer

    folder = Path(tokenizer_dir)
    tj = folder / "tokenizer.json"
    vocab = Tokenizer.from_file(str(tj)) if tj.is_file() else None
    tc = _read_json(folder / "tokenizer_config.json")
    stm = _read_json(folder / "special_tokens_map.json")

    def token_id(key: str) -> int | None:
        name = _token_name(tc.get(key)) or _token_name(stm.get(key))
        return vocab.token_to_id(name) if vocab is not None and name else None

    if separator_id is None:
        # An old checkpoint: the tokenizer's own eos, its files left as they are.
        eos_id, eos_token = token_id("eos_token"), None
    else:
        if vocab is None:
            raise ValueError(f"{tj}: missing; the export needs it to name the separator id "
                             f"{separator_id} the model was trained with; copy the training "
                             "tokenizer's tokenizer.json there")
        eos_id, eos_token = separator_id, vocab.id_to_token(separator_id)
        if eos_token is None:
            raise ValueError(f"{tj}: has no token with id {separator_id}, the separator the "
                             "model was trained with; point the export at the tokenizer the "
                             "run used")
    # Pad: the tokenizer's own pad when it has one, because the exported tokenizer pads batches
    # with it and generate() compares generation_config.pad_token_id with the inputs to detect
    # padding, so the three files must agree. Padded positions are masked, so the model need not
    # have seen it. Without one, the separator, as training does (load_hf_tokenizer), written
    # into the tokenizer files too so the exported tokenizer can pad.
    pad_id, pad_token = token_id("pad_token"), None
    if pad_id is None and eos_id is not None:
        pad_id = eos_id
        pad_token = vocab.id_to_token(eos_id) if vocab is not None else None
    return SpecialTokens(eos_id=eos_id, pad_id=pad_id, eos_token=eos_token, pad_token=pad_token)


def set_tokenizer_special_tokens(folder: str | Path, tokens: SpecialTokens) -> None:
    """Write `tokens`' strings into the tokenizer files of an export folder, so that
    AutoTokenizer.from_pretrained(folder).eos_token_id equals config.json's eos_token_id."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for key, token in (("eos_token", tokens.eos_token), ("pad_token", tokens.pad_token)):
            if token is None:
                continue
            if isinstance(data.get(key), dict):  # an AddedToken: keep its flags
                data[key] = {**data[key], "content": token}
            elif key in data or name == "tokenizer_config.json":
                data[key] = token
        if data.get("add_bos_token"):
            # Training encoded without special tokens: prepending a BOS would show the model
            # inputs it never saw (and config.json says bos_token_id None).
            data["add_bos_token"] = False
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
