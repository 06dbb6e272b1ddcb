"""Generation: the KV-cache path equals the full forward, batched left-padded greedy decoding
equals transformers' generate on the same weights, sampling filters, train mode restored."""

from __future__ import annotations

import pytest
import torch

from argonne_ds.config import ArgonneConfig
from argonne_ds.convert.hf import hf_config, to_hf_state_dict
from argonne_ds.generate import SamplingConfig, _filter_logits, generate_ids
from argonne_ds.model import ArgonneModel

CFG = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=24, intermediate_size=96, max_position_embeddings=64)


def model() -> ArgonneModel:
    torch.manual_seed(0)
    m = ArgonneModel(ArgonneConfig(**CFG))
    with torch.no_grad():  # sharper logits than the init's, so greedy choices are not near-ties
        m.lm_head.weight.mul_(20)
    return m.eval()


def test_kv_cache_steps_equal_the_full_forward() -> None:
    m = model()
    x = torch.randint(0, 97, (2, 12))
    full = m(x).logits
    cache = [[] for _ in m.blocks]
    mask = torch.ones(2, 8, dtype=torch.long)
    parts = [m(x[:, :8], cache=cache, attention_mask=mask).logits]
    for t in range(8, 12):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        parts.append(m(x[:, t:t + 1], cache=cache, attention_mask=mask).logits)
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_batched_greedy_equals_transformers_generate() -> None:
    from transformers import AutoModelForCausalLM

    m = model()
    stock = AutoModelForCausalLM.from_config(hf_config(m.config)).eval()
    stock.load_state_dict(to_hf_state_dict(m.state_dict()), strict=False)
    prompts = [[5, 17, 42, 3, 8, 9], [60, 2], [11, 12, 13]]
    ours = generate_ids(m, prompts, SamplingConfig(max_new_tokens=10, greedy=True), set(), 0)
    for p, new in zip(prompts, ours):  # one at a time on the HF side: no padding questions
        ref = stock.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert new == ref


def test_stops_at_eos_and_restores_train_mode() -> None:
    m = model().train()
    first = generate_ids(m, [[1, 2, 3]], SamplingConfig(max_new_tokens=5, greedy=True), set(), 0)
    stop = {first[0][2]}
    out = generate_ids(m, [[1, 2, 3]], SamplingConfig(max_new_tokens=5, greedy=True), stop, 0)
    assert out[0] == first[0][:3] and m.training


def test_sampling_is_seeded_and_filters() -> None:
    m = model()
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    assert generate_ids(m, [[4, 5]], s, set(), 0) == generate_ids(m, [[4, 5]], s, set(), 0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(_filter_logits(logits, 2, 1.0)[0, 2:]).all()
    kept = torch.isfinite(_filter_logits(logits, 0, 0.7)[0])
    assert kept.tolist() == [True, True, False, False, False]


def test_generate_cli_needs_prompts(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from argonne_ds.cli import main

    args = ["generate", "--model-path", str(tmp_path)]
    assert main(args) == 2
    assert "--prompt" in capsys.readouterr().err
