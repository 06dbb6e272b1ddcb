"""Exported special-token ids: config.json, generation_config.json and the copied tokenizer all
name the separator the model was trained with (Qwen's <|endoftext|>), never Llama's 1/2 defaults
(with the Qwen vocab those are `"` and `#`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from argonne_ds.config import ArgonneConfig
from argonne_ds.convert.export import write_hf_folder
from argonne_ds.model import ArgonneModel
from tests.data_helpers import qwen_tokenizer_dir

ENDOFTEXT, IM_END = 151_643, 151_645


@pytest.fixture(scope="module")
def tiny() -> tuple[ArgonneConfig, dict[str, torch.Tensor]]:
    # The Qwen vocab (151,669 ids) needs the full embedding; hidden 16 keeps it ~5 M params.
    config = ArgonneConfig(vocab_size=151_936, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                           intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    return config, ArgonneModel(config).state_dict()


def _export(tiny: tuple[ArgonneConfig, dict[str, torch.Tensor]], out: Path,
            separator_id: int | None, tokenizer_path: str | None = None) -> Path:
    config, state = tiny
    return write_hf_folder(state, config, out, dtype="fp32", tokenizer_path=tokenizer_path,
                           separator_id=separator_id)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_export_names_the_training_separator_everywhere(tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _export(tiny, tmp_path / "hf", ENDOFTEXT, qwen_tokenizer_dir())
    config = _json(out / "config.json")
    assert config["eos_token_id"] == ENDOFTEXT and config.get("bos_token_id") is None
    assert config["pad_token_id"] == ENDOFTEXT  # Qwen's own pad is <|endoftext|> too
    gen = _json(out / "generation_config.json")
    assert gen["eos_token_id"] == ENDOFTEXT and gen.get("bos_token_id") is None
    assert gen["pad_token_id"] == ENDOFTEXT
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ENDOFTEXT
    assert tok.pad_token_id == ENDOFTEXT
    # The chat template still has its own <|im_end|>: only the document end moved.
    assert tok.convert_tokens_to_ids("<|im_end|>") == IM_END
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.generation_config.eos_token_id == ENDOFTEXT
    assert model.config.eos_token_id == ENDOFTEXT and model.config.bos_token_id is None
    # The source folder is left as it was.
    assert _json(Path(qwen_tokenizer_dir()) / "tokenizer_config.json")["eos_token"] == "<|im_end|>"


def test_old_checkpoint_without_separator_takes_the_tokenizer_eos(tiny, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = _export(tiny, tmp_path / "hf", None, qwen_tokenizer_dir())
    config, gen = _json(out / "config.json"), _json(out / "generation_config.json")
    assert config["eos_token_id"] == IM_END and config.get("bos_token_id") is None
    assert gen["eos_token_id"] == IM_END and gen.get("bos_token_id") is None
    assert config["pad_token_id"] == gen["pad_token_id"] == ENDOFTEXT  # the tokenizer's pad
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.eos_token_id == IM_END  # the tokenizer files are copied unchanged


def test_export_without_tokenizer_writes_no_llama_defaults(tiny, tmp_path: Path) -> None:
    out = _export(tiny, tmp_path / "hf", None)
    config = _json(out / "config.json")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config.get(key) is None, key
    assert _json(out / "generation_config.json").get("eos_token_id") is None
