"""The synthetic retrieval probe (probe.py, `argonne-ds eval --probe retrieval`): prompts of the
exact length with the key at the asked depth, found only there; an oracle scores 1 and a model
that answers something else 0; the CLI runs it on an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from argonne_ds.cli import main
from argonne_ds.probe import examples, retrieval_probe
from tests.data_helpers import qwen_tokenizer_dir


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


def encoder(tok):
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_a_prompt_is_its_length_with_the_key_at_its_depth(tok, depth: float) -> None:
    encode = encoder(tok)
    for case in examples(encode, 600, depth, n=3, seed=1):
        assert len(case.prompt) == 600
        text = tok.decode(case.prompt)
        assert text.count(case.value) == 1  # planted once: not in the filler, not in the question
        key = text.rsplit("secret code of ", 1)[1].split()[0]
        needle = encode(f" The secret code of {key} is {case.value}. ")
        question = encode(f" What is the secret code of {key}? The secret code of {key} is")
        assert case.prompt[case.needle_at:case.needle_at + len(needle)] == needle
        assert case.prompt[-len(question):] == question
        assert case.needle_at == round(depth * (600 - len(needle) - len(question)))


def test_an_oracle_scores_one_and_a_wrong_answer_zero(tok) -> None:
    encode = encoder(tok)

    def oracle(prompts: list[list[int]]) -> list[str]:
        out = []
        for p in prompts:
            text = tok.decode(p)
            key = text.rsplit("secret code of ", 1)[1].split()[0]
            out.append(" " + text.split(f"secret code of {key} is ")[1][:6] + ".")
        return out

    got = retrieval_probe(oracle, encode, [300, 700], [0.1, 0.9], n=3)
    assert got == {"300@0.1": 1.0, "300@0.9": 1.0, "700@0.1": 1.0, "700@0.9": 1.0}
    wrong = retrieval_probe(lambda ps: [" 000000"] * len(ps), encode, [300], [0.5], n=3, seed=5)
    assert wrong == {"300@0.5": 0.0}
    with pytest.raises(ValueError, match="too short"):
        examples(encode, 20, 0.5, 1)
    with pytest.raises(ValueError, match="depth"):
        examples(encode, 300, 1.5, 1)


@pytest.mark.slow
def test_the_cli_runs_the_probe_on_an_exported_model(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from argonne_ds.config import ArgonneConfig
    from argonne_ds.convert.hf import hf_config, to_hf_state_dict
    from argonne_ds.model import ArgonneModel

    torch.manual_seed(0)
    model = ArgonneModel(ArgonneConfig(vocab_size=151_669, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=16, intermediate_size=64,
                                       max_position_embeddings=512))
    stock = AutoModelForCausalLM.from_config(hf_config(model.config))
    stock.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    stock.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(qwen_tokenizer_dir()).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert main(["eval", "--model-path", str(tmp_path / "hf"), "--probe", "retrieval",
                 "--probe-lengths", "200", "400", "--probe-depths", "0.5", "--probe-samples",
                 "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["probe"] == "retrieval" and set(out["accuracy"]) == {"200@0.5", "400@0.5"}
    assert all(0.0 <= v <= 1.0 for v in out["accuracy"].values())
    assert main(["eval", "--model-path", str(tmp_path / "hf"), "--probe", "retrieval",
                 "--probe-lengths", "600"]) == 2  # past its 512-token context: one line
    assert "exceeds the model's context (512)" in capsys.readouterr().err
