"""Model configuration: `ArgonneConfig` (a Hugging Face `PretrainedConfig`) and the named presets.

The Argonne 1.x names `n_layer`, `n_head`, `n_embd` and `block_size` are accepted as aliases so old
config files keep working.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

# Argonne 1.x name -> Argonne 2.0 (Hugging Face) name.
ALIASES: dict[str, str] = {
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_embd": "hidden_size",
    "block_size": "max_position_embeddings",
}


# RoPE variants (transformers 5.x `rope_parameters`), each with the keys it takes besides
# rope_type/rope_theta, and those it needs. The frequencies are transformers' own (layers.py).
ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
}
ROPE_NEEDS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def rope_parameters_of(rope_parameters: dict[str, Any] | None, rope_theta: float,
                       max_position_embeddings: int) -> dict[str, Any]:
    """The normalised `rope_parameters`: rope_type and rope_theta always present (a θ given
    inside wins over `rope_theta`), yarn/llama3's original context defaulting to this one."""
    rope = dict(rope_parameters or {})
    rope["rope_type"] = str(rope.pop("type", None) or rope.get("rope_type") or "default")
    rope["rope_theta"] = float(rope.get("rope_theta", rope_theta))
    if rope["rope_type"] in ("yarn", "llama3"):
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    return rope


def default_intermediate_size(hidden_size: int, multiple_of: int = 256) -> int:
    """SwiGLU width: 8/3 * hidden, rounded up to a multiple of `multiple_of` (4096 -> 11,008)."""
    return multiple_of * math.ceil(8 * hidden_size / (3 * multiple_of))


class ArgonneConfig(PretrainedConfig):
    """An Argonne 2.0 decoder-only model: GQA, RoPE, RMSNorm, SwiGLU, untied head."""

    model_type = "argonne2"

    def __init__(
        self,
        vocab_size: int = 151_936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 24,
        num_key_value_heads: int = 8,
        head_dim: int | None = 128,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 4096,
        rope_theta: float = 500_000.0,
        rope_parameters: dict[str, Any] | None = None,
        rms_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        use_flash_attention: bool = True,
        use_gradient_checkpointing: bool = False,
        mlp_tiles: int = 1,
        document_masking: bool = False,
        document_positions: bool = False,
        document_separator_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        explicit = {
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "hidden_size": hidden_size,
            "max_position_embeddings": max_position_embeddings,
        }
        for old, new in ALIASES.items():
            if old in kwargs:
                explicit[new] = int(kwargs.pop(old))
        self.vocab_size = int(vocab_size)
        self.hidden_size = explicit["hidden_size"]
        self.num_hidden_layers = explicit["num_hidden_layers"]
        self.num_attention_heads = explicit["num_attention_heads"]
        self.num_key_value_heads = int(num_key_value_heads)
        self.head_dim = None if head_dim is None else int(head_dim)
        self.intermediate_size = (
            default_intermediate_size(self.hidden_size)
            if intermediate_size is None
            else int(intermediate_size)
        )
        self.max_position_embeddings = explicit["max_position_embeddings"]
        # transformers' old name for the scaling dict (configs written before 5.x).
        self.rope_parameters = rope_parameters_of(
            rope_parameters or kwargs.pop("rope_scaling", None), rope_theta,
            self.max_position_embeddings)
        self.rope_theta = self.rope_parameters["rope_theta"]
        self.rms_norm_eps = float(rms_norm_eps)
        self.attention_dropout = float(attention_dropout)
        self.hidden_dropout = float(hidden_dropout)
        self.initializer_range = float(initializer_range)
        self.use_flash_attention = bool(use_flash_attention)
        self.use_gradient_checkpointing = bool(use_gradient_checkpointing)
        # The MLP run in this many pieces along the sequence, each recomputed in backward: its
        # 4 x intermediate-wide activations are never all held (long context; model/layers.py).
        self.mlp_tiles = int(mlp_tiles)
        # Packed blocks hold several documents, each ended by the separator: attend only within
        # a document, and/or restart the RoPE positions at each document (model.py).
        self.document_masking = bool(document_masking)
        self.document_positions = bool(document_positions)
        self.document_separator_id = (
            None if document_separator_id is None else int(document_separator_id))
        # Ours first: clearer messages than transformers' own RoPE validation in super().
        self._validate()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ArgonneConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
            f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention",
        )
        if self.head_dim is None:
            need(
                self.hidden_size % self.num_attention_heads == 0,
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly (e.g. head_dim=128)",
            )
            self.head_dim = self.hidden_size // self.num_attention_heads
        need(self.head_dim > 0 and self.head_dim % 2 == 0,
             f"head_dim must be a positive even number for RoPE, got {self.head_dim}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.mlp_tiles >= 1, f"mlp_tiles must be >= 1, got {self.mlp_tiles}")
        self._validate_rope(need)
        for name in ("attention_dropout", "hidden_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1)")
        if self.uses_document_ids:
            option = "document_masking" if self.document_masking else "document_positions"
            sep = self.document_separator_id
            need(sep is not None,
                 f"{option}=true needs document_separator_id, the token id that ends every "
                 "document in the packed data (Qwen's <|endoftext|> is 151643; `argonne-ds "
                 "prepare` prints the tokenizer's)")
            need(0 <= sep < self.vocab_size,
                 f"document_separator_id {sep} is outside the vocabulary [0, {self.vocab_size})")

    def _validate_rope(self, need: Any) -> None:
        rope = self.rope_parameters
        kind = rope["rope_type"]
        need(kind in ROPE_KEYS, f"rope_parameters.rope_type {kind!r} is not one of "
             f"{', '.join(ROPE_KEYS)}")
        extra = set(rope) - {"rope_type", "rope_theta", *ROPE_KEYS[kind]}
        need(not extra, f"rope_parameters: {', '.join(sorted(extra))} not taken by rope_type "
             f"{kind!r} (it takes {', '.join(ROPE_KEYS[kind]) or 'only rope_theta'})")
        missing = [k for k in ROPE_NEEDS.get(kind, ()) if rope.get(k) is None]
        need(not missing, f"rope_parameters: rope_type {kind!r} needs {', '.join(missing)}")
        if rope.get("factor") is not None:
            need(float(rope["factor"]) >= 1.0,
                 f"rope_parameters.factor must be >= 1 (a context stretched, not shrunk), got "
                 f"{rope['factor']}")
        original = rope.get("original_max_position_embeddings")
        if original is not None:
            need(0 < int(original) <= self.max_position_embeddings,
                 f"rope_parameters.original_max_position_embeddings ({original}) must be in "
                 f"(0, max_position_embeddings = {self.max_position_embeddings}]: it is the "
                 "context the model was trained at before the extension")
        if kind == "llama3":
            need(rope["high_freq_factor"] > rope["low_freq_factor"],
                 "rope_parameters: llama3 needs high_freq_factor > low_freq_factor")

    @property
    def rope_type(self) -> str:
        return str(self.rope_parameters["rope_type"])

    @property
    def uses_document_ids(self) -> bool:
        """The blocks need each position's document: masking, restarted positions, or both."""
        return self.document_masking or self.document_positions

    # Argonne 1.x names, read-only.
    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def block_size(self) -> int:
        return self.max_position_embeddings


# The seed model. 4096/24 is not integral: head_dim is explicit (128), see docs/model.md "head_dim".
_ARGONNE2: dict[str, Any] = dict(
    vocab_size=151_936,
    hidden_size=4096,
    num_hidden_layers=24,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=11_008,
    max_position_embeddings=4096,
    rope_theta=500_000.0,
    tie_word_embeddings=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    "argonne2": _ARGONNE2,
    # Exactly as the original code trained: head_dim floored to 4096 // 24 = 170, Qwen2.5 vocab.
    "argonne2-orig": {**_ARGONNE2, "head_dim": 170, "vocab_size": 151_665},
    # ~1.3B, for single-GPU benchmarks.
    "argonne2-1b": {
        **_ARGONNE2,
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 5632,
    },
    # CPU tests and the demo. Vocab matches the fallback tokenizer's default size.
    "tiny": dict(
        vocab_size=32_000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
    ),
}


HF_ONLY = ("model_type", "architectures", "transformers_version")  # not ArgonneConfig's


def load_model_config(name_or_path: str | Path, **overrides: Any) -> ArgonneConfig:
    """A preset name, a JSON file, or a directory holding `config.json`; `overrides` win."""
    key = str(name_or_path)
    if key in PRESETS:
        return ArgonneConfig(**{**PRESETS[key], **overrides})
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"model config {key!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
            "JSON file or directory with config.json"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {path} is not valid JSON: {e}") from e
    for hf_only in HF_ONLY:
        data.pop(hf_only, None)
    return ArgonneConfig(**{**data, **overrides})


def with_context(config: ArgonneConfig, block_size: int,
                 rope_parameters: dict[str, Any] | None, trained: int | None = None
                 ) -> ArgonneConfig:
    """The model of a context-extension phase: its context grown to `block_size` and its RoPE
    set to the phase's (yarn/llama3's original context defaulting to `trained`, the context
    the run trained at before, else the model's). No weight depends on either, so the same
    checkpoint loads into it."""
    data = config.to_dict()
    for hf_only in (*HF_ONLY, "rope_scaling"):  # rope_parameters holds it
        data.pop(hf_only, None)
    data["max_position_embeddings"] = max(config.max_position_embeddings, block_size)
    if rope_parameters is not None:
        rope = dict(rope_parameters)
        if rope.get("rope_type") in ("yarn", "llama3"):
            rope.setdefault("original_max_position_embeddings",
                            min(trained or config.max_position_embeddings,
                                config.max_position_embeddings))
        data["rope_parameters"] = rope
    return ArgonneConfig(**data)
