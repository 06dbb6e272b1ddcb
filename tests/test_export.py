"""Export to Hugging Face: checkpoints written by the real trainer (pipeline and ZeRO-3, 2 ranks)
load in stock transformers without remote code, with logits equal to ArgonneModel's, and import
back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from argonne_ds.checkpoint.store import resolve_checkpoint
from argonne_ds.cli import main
from argonne_ds.config import ArgonneConfig
from argonne_ds.convert.export import full_state, import_hf
from argonne_ds.model import ArgonneModel
from tests.train_helpers import MODEL, ROOT, run, steps, train_cmd


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["cpu_pipeline.json", "cpu_zero3.json"])
def test_export_loads_in_transformers_with_equal_logits(ws, tmp_path: Path, ds_config: str,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    run(train_cmd(ws, ds_config, out, "--max-steps", "6", "--save-interval", "6"))
    hf_dir = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(out / "checkpoints"), "--out", str(hf_dir),
                 "--dtype", "fp32"]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["head_dim"] == 16
    stock = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=False).eval()
    directory, tag, info = resolve_checkpoint(out / "checkpoints")
    ours = ArgonneModel(ArgonneConfig(**MODEL)).eval()
    ours.load_state_dict(full_state(directory, tag, info))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok("in the beginning was the people of the time")["input_ids"]])
    with torch.no_grad():
        diff = (stock(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-5
    # The exported weights are the trained ones: they fit the data better than at step 1.
    with torch.no_grad():
        loss = ours(ids[:, :-1], labels=ids[:, 1:]).loss.item()
    assert loss < steps(out)[1]["loss"]
    # The CLI generates from the export and from the checkpoint itself, identically (greedy).
    outs = []
    capsys.readouterr()
    for source in (["--model-path", str(hf_dir)], ["--checkpoint", str(out / "checkpoints")]):
        assert main(["generate", *source, "--prompt", "in the", "--prompt", "the people of",
                     "--greedy", "--max-new-tokens", "6", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] and [o["prompt"] for o in outs[0]] == ["in the", "the people of"]
    # ... and import back is exact.
    back_config, back = import_hf(hf_dir)
    assert back_config.head_dim == 16 and back_config.num_key_value_heads == 2
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_export_refuses_what_is_not_a_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no complete argonne-ds checkpoint" in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.slow
def test_training_continues_from_an_hf_folder_exactly(ws, tmp_path: Path) -> None:
    """ZeRO-3 run -> export -> a pipeline run starting from the HF folder: its first loss is the
    plain model's loss on that first global batch, computed here independently."""
    from argonne_ds.data.loader import DataConfig, build_data_iterator

    run(train_cmd(ws, "cpu_zero3.json", tmp_path / "a", "--max-steps", "4",
                  "--save-interval", "4"))
    hf_dir = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tmp_path / "a" / "checkpoints"), "--out",
                 str(hf_dir), "--dtype", "fp32"]) == 0
    b = tmp_path / "b"
    res = run(train_cmd(ws, "cpu_pipeline.json", b, "--from-hf", str(hf_dir), "--max-steps", "1",
                        "--save-interval", "1"))
    assert f"starting from the weights of {hf_dir}" in res.stdout
    model = ArgonneModel(ArgonneConfig(**MODEL)).eval()
    _, tag, info = resolve_checkpoint(tmp_path / "a" / "checkpoints")
    model.load_state_dict(full_state(tmp_path / "a" / "checkpoints", tag, info))
    data = DataConfig([ws["glob"]], cache_dir=ws["cache"], block_size=32,
                      fallback_vocab_size=512)
    batch = json.loads((ROOT / "ds_configs" / "cpu_pipeline.json").read_text())["train_batch_size"]
    it, _ = build_data_iterator(data, global_batch_size=batch, micro_batch_size=batch,
                                show_progress=False)
    x, y = next(it)
    with torch.no_grad():
        expected = model(x, labels=y).loss.item()
    assert steps(b)[1]["loss"] == pytest.approx(expected, rel=1e-5)
