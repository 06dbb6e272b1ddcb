"""RoPE scaling (transformers 5.x `rope_parameters`): each type's logits equal stock Llama /
Mistral in fp32, the export writes it so that vanilla transformers reproduces them, the KV-cache
path and generate use it, the config refuses what transformers would silently misread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from argonne_ds.config import ArgonneConfig, load_model_config
from argonne_ds.convert.export import hf_model_config
from argonne_ds.convert.hf import hf_config, to_hf_state_dict
from argonne_ds.generate import SamplingConfig, generate_ids
from argonne_ds.model import ArgonneModel

BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
            rope_theta=10_000.0)

# Each type at a 16 -> 64 extension, the parameters chosen so every frequency band is in play
# (llama3: wavelengths from 6 to ~6e3 around its 4 .. 16 smoothing band; yarn: its ramp).
ROPES: dict[str, dict] = {
    "default": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-beta": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                  "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.2},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


def pair(rope: dict, head_dim: int | None = None) -> tuple[ArgonneModel, torch.nn.Module]:
    torch.manual_seed(0)
    config = ArgonneConfig(**BASE, head_dim=head_dim, rope_parameters=dict(rope))
    ours = ArgonneModel(config).eval()
    stock = AutoModelForCausalLM.from_config(hf_config(config), attn_implementation="eager")
    missing, unexpected = stock.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return ours, stock.eval()


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("head_dim", [None, 24])  # Llama, Mistral
def test_logits_equal_stock_transformers(name: str, head_dim: int | None) -> None:
    ours, stock = pair(ROPES[name], head_dim)
    assert stock.config.rope_parameters["rope_type"] == ROPES[name]["rope_type"]
    # dynamic only differs from default past the context: read past it (what it is for).
    T = 96 if name == "dynamic" else 64
    x = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        a, b = ours(x).logits, stock(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-5


def test_the_scaling_changes_the_logits() -> None:
    """Not a vacuous parity: each scaled type gives other logits than plain RoPE."""
    x = torch.randint(0, 97, (1, 96))
    with torch.no_grad():
        plain = pair({"rope_type": "dynamic", "factor": 1.0})[0](x).logits
        for name in ("linear", "dynamic", "yarn", "llama3"):
            scaled = pair(ROPES[name])[0](x[:, :96 if name == "dynamic" else 64]).logits
            assert (scaled - plain[:, :scaled.shape[1]]).abs().max().item() > 1e-4, name


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn", "llama3"])
def test_kv_cache_and_generate_use_the_scaling(name: str) -> None:
    ours, stock = pair(ROPES[name])
    with torch.no_grad():
        ours.lm_head.weight.mul_(20)  # sharper logits: greedy choices are not near-ties
        stock.lm_head.weight.copy_(ours.lm_head.weight)
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = ours(x).logits
        cache = [[] for _ in ours.blocks]
        parts = [ours(x[:, :30], cache=cache, attention_mask=torch.ones(2, 30, dtype=torch.long))
                 .logits]
        for t in range(30, 40):
            mask = torch.ones(2, t + 1, dtype=torch.long)
            parts.append(ours(x[:, t:t + 1], cache=cache, attention_mask=mask).logits)
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
    prompt = x[0, :50 if name == "dynamic" else 30].tolist()
    new = 30 if name == "dynamic" else 20  # dynamic: on past the 64-token context
    got = generate_ids(ours, [prompt], SamplingConfig(max_new_tokens=new, greedy=True), set(), 0)
    ref = stock.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got[0] == ref


def test_export_folder_reproduces_the_logits_in_vanilla_transformers(tmp_path: Path) -> None:
    ours, _ = pair(ROPES["yarn"], head_dim=24)
    stock = AutoModelForCausalLM.from_config(hf_config(ours.config))
    stock.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    stock.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    x = torch.randint(0, 97, (1, 64))
    with torch.no_grad():
        assert (ours(x).logits - again(input_ids=x).logits).abs().max().item() < 1e-5
    # ... and the folder comes back in as the same rope (continued training, import).
    back = hf_model_config(tmp_path)
    assert back.rope_parameters == ours.config.rope_parameters


def test_config_round_trip_and_old_names(tmp_path: Path) -> None:
    config = ArgonneConfig(**BASE, rope_parameters=dict(ROPES["llama3"]))
    config.save_pretrained(tmp_path)
    again = load_model_config(tmp_path)
    assert again.rope_parameters == config.rope_parameters and again.rope_theta == 10_000.0
    # transformers' pre-5.x `rope_scaling` with `type`; rope_theta outside the dict.
    old = ArgonneConfig(**{**BASE, "rope_theta": 5e5},
                        rope_scaling={"type": "linear", "factor": 2.0})
    assert old.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    # θ inside the dict wins and is what rope_theta reports.
    assert ArgonneConfig(**BASE, rope_parameters={"rope_theta": 1e6}).rope_theta == 1e6


@pytest.mark.parametrize("rope,needle", [
    ({"rope_type": "ntk-by-parts"}, "is not one of"),
    ({"rope_type": "linear"}, "needs factor"),
    ({"rope_type": "linear", "factor": 0.5}, ">= 1"),
    ({"rope_type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}, "not taken by"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "high_freq_factor > low_freq_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
     "original_max_position_embeddings"),
])
def test_config_refuses_bad_rope_parameters(rope: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ArgonneConfig(**BASE, rope_parameters=rope)


def test_beyond_the_context_is_refused_unless_dynamic() -> None:
    ours, _ = pair(ROPES["yarn"])
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        ours(torch.zeros(1, 65, dtype=torch.long))
