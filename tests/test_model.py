"""The plain model: config validation, presets, init, one shift, parity with stock transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from argonne_ds.config import PRESETS, ArgonneConfig, load_model_config
from argonne_ds.convert.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from argonne_ds.model import ArgonneModel, count_parameters


def small_config(**kw: object) -> ArgonneConfig:
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=None, intermediate_size=96,
                max_position_embeddings=64, rope_theta=500_000.0)
    return ArgonneConfig(**{**base, **kw})


# ---- item 2: config ---------------------------------------------------------------------------


def test_argonne2_orig_parameter_count_matches_the_original() -> None:
    config = load_model_config("argonne2-orig")
    assert count_parameters(config)["total"] == 5_558_579_200
    assert (config.head_dim, config.vocab_size) == (170, 151_665)


def test_parameter_count_formula_matches_a_built_model() -> None:
    config = small_config(head_dim=24, tie_word_embeddings=False)
    model = ArgonneModel(config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)["total"]


def test_argonne2_preset_is_the_seed() -> None:
    c = load_model_config("argonne2")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        24, 4096, 24, 8)
    assert (c.head_dim, c.intermediate_size, c.rope_theta, c.max_position_embeddings) == (
        128, 11_008, 500_000.0, 4096)
    assert c.tie_word_embeddings is False and c.vocab_size == 151_936
    assert c.attention_dropout == 0.0 and c.hidden_dropout == 0.0


def test_1b_preset_shape() -> None:
    # The "~1.3B" shape: 1.13B non-embedding; the untied Qwen vocab adds 0.62B.
    c = load_model_config("argonne2-1b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        2048, 24, 16, 8)
    assert (c.head_dim, c.intermediate_size) == (128, 5632)
    counts = count_parameters(c)
    assert counts["non_embedding"] == 1_132_562_432
    assert counts["total"] == 1_754_892_288


@pytest.mark.parametrize("hidden,expected", [(4096, 11_008), (2048, 5632), (64, 256)])
def test_default_intermediate_size_8_3_hidden_rounded_to_256(hidden: int, expected: int) -> None:
    c = ArgonneConfig(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=None, intermediate_size=None)
    assert c.intermediate_size == expected


def test_argonne1_aliases() -> None:
    c = ArgonneConfig(n_layer=3, n_head=4, n_embd=64, block_size=128, num_key_value_heads=2,
                      head_dim=None)
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size) == (3, 4, 64)
    assert c.max_position_embeddings == 128
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (3, 4, 64, 128)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "divisible by num_key_value_heads"),
        (dict(hidden_size=100, num_attention_heads=6, num_key_value_heads=2, head_dim=None),
         "set head_dim"),
        (dict(head_dim=33), "even"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_config_validation_messages(kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        small_config(**kw)


def test_config_round_trips_through_json(tmp_path) -> None:
    config = load_model_config("argonne2")
    config.save_pretrained(tmp_path)
    again = load_model_config(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert again.rope_theta == 500_000.0 and again.head_dim == 128


def test_every_preset_builds_a_valid_config() -> None:
    for name in PRESETS:
        assert load_model_config(name).head_dim % 2 == 0


def test_unknown_model_config_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_model_config("argonne3-huge")


# ---- item 3: model ----------------------------------------------------------------------------


def test_init_scales_residual_projections_down() -> None:
    torch.manual_seed(0)
    config = small_config(hidden_size=256, num_hidden_layers=8, intermediate_size=512)
    model = ArgonneModel(config)
    std = config.initializer_range
    scaled = std / math.sqrt(2 * config.num_hidden_layers)
    for block in model.blocks:
        assert block.attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
        assert block.attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert block.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert torch.all(block.input_norm.weight == 1)
    assert model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()


def test_parameter_names_are_the_originals() -> None:
    names = set(ArgonneModel(small_config()).state_dict())
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"blocks.{i}.attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"blocks.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"blocks.{i}.input_norm.weight", f"blocks.{i}.post_norm.weight"}
    assert names == expected


def test_rmsnorm_variance_in_fp32() -> None:
    from argonne_ds.model.model import RMSNorm

    norm = RMSNorm(8)
    x = torch.full((1, 8), 300.0, dtype=torch.float16)  # x^2 overflows fp16 (max 65504)
    y = norm(x)
    assert torch.isfinite(y).all() and torch.allclose(y.float(), torch.ones(1, 8), atol=1e-3)


def test_loss_is_causal_and_labels_are_not_shifted_again() -> None:
    """Position t's loss must depend on label t only: change label t and only loss term t moves."""
    torch.manual_seed(0)
    model = ArgonneModel(small_config()).eval()
    x = torch.randint(0, 97, (1, 12))
    labels = torch.randint(0, 97, (1, 12))
    logits = model(x).logits
    per_token = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    assert model(x, labels=labels).loss.item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    # Causality: changing token 7 leaves logits of positions < 7 unchanged.
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 97
    other = model(y).logits
    assert torch.allclose(logits[0, :7], other[0, :7], atol=1e-6)
    assert not torch.allclose(logits[0, 7], other[0, 7], atol=1e-6)


def test_ignore_index_is_minus_100() -> None:
    torch.manual_seed(0)
    model = ArgonneModel(small_config()).eval()
    x = torch.randint(0, 97, (1, 8))
    labels = x.clone()
    labels[0, :4] = -100
    logits = model(x).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], labels[0, 4:])
    assert model(x, labels=labels).loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    config = small_config()
    a = ArgonneModel(config)
    b = ArgonneModel(small_config(use_gradient_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (2, 16))
    for m in (a, b):
        m.train()
        m(x, labels=x).loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_save_and_from_pretrained(tmp_path) -> None:
    torch.manual_seed(0)
    model = ArgonneModel(small_config()).eval()
    model.save_pretrained(tmp_path)
    again = ArgonneModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 97, (1, 10))
    assert torch.equal(model(x).logits, again(x).logits)


def test_bf16_forward_backward_runs() -> None:
    model = ArgonneModel(small_config()).to(torch.bfloat16)
    x = torch.randint(0, 97, (2, 8))
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None


# ---- item 4: parity with stock transformers -------------------------------------------------


@pytest.mark.parametrize(
    "kw,arch",
    [
        (dict(head_dim=None), "LlamaForCausalLM"),  # head_dim = hidden/heads
        (dict(head_dim=24), "MistralForCausalLM"),  # explicit head_dim, 4*24 != 64
        (dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2, head_dim=16),
         "MistralForCausalLM"),  # hidden/heads integral (12) but head_dim differs
    ],
)
def test_logits_match_stock_transformers(kw: dict, arch: str) -> None:
    torch.manual_seed(0)
    config = small_config(**kw)
    ours = ArgonneModel(config).eval()
    stock = AutoModelForCausalLM.from_config(hf_config(config), attn_implementation="eager").eval()
    assert type(stock).__name__ == arch
    missing, unexpected = stock.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randint(0, config.vocab_size, (3, 40))
    with torch.no_grad():
        a = ours(x).logits
        out = stock(input_ids=x, labels=x)
    assert (a - out.logits).abs().max().item() < 1e-5
    # HF shifts internally; we take pre-shifted labels: (x[:-1] -> x[1:]) must give HF's loss.
    with torch.no_grad():
        ours_loss = ours(x[:, :-1], labels=x[:, 1:]).loss
    assert ours_loss.item() == pytest.approx(out.loss.item(), abs=1e-5)
    # ... and the key map is exact in both directions.
    back = from_hf_state_dict(stock.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
