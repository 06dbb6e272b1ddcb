"""`argonne-ds eval`: token-weighted loss over every block of the held-out data, exactly once,
and by position."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from argonne_ds.cli import main
from argonne_ds.config import ArgonneConfig
from argonne_ds.convert.hf import hf_config, to_hf_state_dict
from argonne_ds.data.cache import TokenStore, prepare_cache
from argonne_ds.data.discovery import discover_shards
from argonne_ds.data.loader import DataConfig
from argonne_ds.data.tokenizer import load_tokenizer
from argonne_ds.evaluate import evaluate
from argonne_ds.model import ArgonneModel
from tests.data_helpers import qwen_tokenizer_dir, write_corpus

CFG = dict(vocab_size=151_669, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=32)


@pytest.mark.slow
def test_eval_covers_every_block_once(tmp_path: Path, capsys) -> None:
    write_corpus(tmp_path / "shards")
    torch.manual_seed(0)
    model = ArgonneModel(ArgonneConfig(**CFG)).eval()
    data = DataConfig([str(tmp_path / "shards" / "*.parquet")], tokenizer_path=qwen_tokenizer_dir(),
                      cache_dir=str(tmp_path / "cache"), block_size=16)
    result = evaluate(model, data, batch_size=7, show_progress=False)
    # Reference: every block of the cache, once, by hand.
    index = prepare_cache(discover_shards(data.data_glob), load_tokenizer(qwen_tokenizer_dir()),
                          data.cache_dir)
    store = TokenStore(index.token_paths())
    n = (len(store) - 1) // 16
    blocks = torch.from_numpy(np.stack([store.read(b * 16, b * 16 + 17).astype("int64")
                                        for b in range(n)]))
    with torch.no_grad():  # the whole logits' per-token cross-entropy (n, 16), by hand
        per = torch.nn.functional.cross_entropy(
            model(blocks[:, :-1]).logits.float().transpose(1, 2), blocks[:, 1:],
            reduction="none")
    ref = per.mean().item()
    assert result["blocks"] == n and n % 7  # the last batch was partial
    assert math.isclose(result["loss"], ref, rel_tol=1e-5)
    # By position: averaged per bucket
    expected = {f"{a}-{b - 1}": per[:, a:b].mean().item() for a, b in
                ((0, 2), (2, 4), (4, 8), (8, 16))}
    assert result["by_position"] == pytest.approx(expected, rel=1e-5)
    # The CLI on an HF folder gives the same figure.
    hf = tmp_path / "hf"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stock = AutoModelForCausalLM.from_config(hf_config(model.config))
    stock.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    stock.save_pretrained(hf)
    AutoTokenizer.from_pretrained(qwen_tokenizer_dir()).save_pretrained(hf)
    capsys.readouterr()
    assert main(["eval", "--model-path", str(hf), "--data-glob", data.data_glob[0],
                 "--block-size", "16", "--batch-size", "7", "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert math.isclose(out["loss"], ref, rel_tol=1e-5) and out["blocks"] == n
    assert (out["device"], out["dtype"]) == ("cpu", "float32")  # auto without a GPU
    # bf16, as "auto" runs on a GPU: the same blocks, the loss within bf16's rounding
    assert main(["eval", "--model-path", str(hf), "--data-glob", data.data_glob[0],
                 "--block-size", "16", "--batch-size", "7", "--no-progress", "--json",
                 "--dtype", "bf16"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["dtype"] == "bfloat16" and half["blocks"] == n
    assert math.isclose(half["loss"], ref, rel_tol=2e-2) and half["loss"] != out["loss"]
