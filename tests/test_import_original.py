"""Importing an original Argonne 2.0 checkpoint (built here in its format): weights exact, step
and LR schedule carried into `train --from-hf`; Argonne 1.x refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from argonne_ds.cli import main
from argonne_ds.config import ArgonneConfig
from argonne_ds.convert.export import import_hf
from argonne_ds.model import ArgonneModel
from tests.train_helpers import MODEL, make_workspace, run, steps, train_cmd

# In the original's format: reading row 10 of its second shard (natural order), chunk 1 of that
# document last trained on.
POSITION = {"streaming": True, "current_file_idx": 1, "position_in_file": 10, "chunk_offset": 1,
            "current_position": 0, "epoch": 0,
            "files_processed": ["part_1.parquet", "part_2.parquet"]}


def original_checkpoint(path: Path, compiled: bool = True, fsdp: bool = False) -> ArgonneModel:
    torch.manual_seed(3)
    model = ArgonneModel(ArgonneConfig(**MODEL)).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prefix = "_orig_mod." if compiled else ""

    def name(k: str) -> str:  # FSDP: a full state dict saved from inside the wrapped blocks
        return k.replace("blocks.0.", "blocks.0._fsdp_wrapped_module.") if fsdp else k

    torch.save({
        **({"format": "fsdp_full_state"} if fsdp else {}),
        "model_state_dict": {prefix + name(k): v for k, v in model.state_dict().items()},
        "model_dtype": "bfloat16", "optimizer_state_dict": opt.state_dict(),
        "scheduler_state_dict": {"step": 7}, "global_step": 7, "tokens_processed": 3584,
        "batch_size": 4, "epoch": 0, "loss": 5.5,
        "data_position": POSITION,
    }, path)
    return model


@pytest.mark.parametrize("fsdp", [False, True])
def test_weights_are_exact_and_the_step_recorded(tmp_path: Path, capsys, fsdp: bool) -> None:
    original = original_checkpoint(tmp_path / "orig.pth", fsdp=fsdp)
    (tmp_path / "m.json").write_text(json.dumps(MODEL))
    assert main(["import-original", "--checkpoint", str(tmp_path / "orig.pth"), "--out",
                 str(tmp_path / "hf"), "--model", str(tmp_path / "m.json")]) == 0
    assert "step 7, 3,584 tokens" in capsys.readouterr().out
    config, state = import_hf(tmp_path / "hf")
    assert config.head_dim == MODEL["head_dim"]
    assert all(torch.equal(state[k], v.float()) for k, v in original.state_dict().items())
    meta = json.loads((tmp_path / "hf" / "argonne_import.json").read_text())
    assert meta["step"] == 7 and meta["data_position"]["current_file_idx"] == 1
    assert meta["format"] == ("fsdp_full_state" if fsdp else "plain")


def test_argonne1_and_mismatched_checkpoints_are_refused(tmp_path: Path, capsys) -> None:
    torch.save({"model_state_dict": {"transformer.wte.weight": torch.zeros(4, 2),
                                     "transformer.wpe.weight": torch.zeros(8, 2),
                                     "transformer.h.0.ln_1.weight": torch.zeros(2)}},
               tmp_path / "v1.pth")
    assert main(["import-original", "--checkpoint", str(tmp_path / "v1.pth"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "Argonne 1.x checkpoint" in capsys.readouterr().err
    original_checkpoint(tmp_path / "orig.pth")
    assert main(["import-original", "--checkpoint", str(tmp_path / "orig.pth"), "--out",
                 str(tmp_path / "y")]) == 2  # the default argonne2-orig shape does not fit
    assert "do not fit the model config" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert main(["import-original", "--checkpoint", str(tmp_path / "junk.pth"), "--out",
                 str(tmp_path / "z")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_train_continues_at_the_imported_step(tmp_path: Path) -> None:
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    ws = make_workspace(tmp_path / "ws")
    original_checkpoint(tmp_path / "orig.pth")
    (tmp_path / "m.json").write_text(json.dumps(MODEL))
    assert main(["import-original", "--checkpoint", str(tmp_path / "orig.pth"), "--out",
                 str(tmp_path / "hf"), "--model", str(tmp_path / "m.json")]) == 0
    out = tmp_path / "run"
    res = run(train_cmd(ws, "cpu_zero3.json", out, "--from-hf", str(tmp_path / "hf"),
                        "--max-steps", "9", "--save-interval", "9"))
    assert "LR schedule continues at step 7" in res.stdout
    s = steps(out)
    assert sorted(s) == [8, 9] and s[8]["tokens"] == 3584 + 16 * 32
    # The data position, recomputed here from the parquet files with HF tokenizers: every token
    # of part_1, rows 0-9 of part_2, and chunks 0-1 (2 x 32 tokens) of row 10, each document
    # followed by the separator; training continues at the next block boundary.
    want = expected_samples(ws, block=32)
    assert f"-> sample {want:,}" in res.stdout, res.stdout
    assert s[8]["samples"] == want + 16  # one global batch (16) after it
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = WarmupCosineLR(opt, total_num_steps=9, warmup_num_steps=3, warmup_type="linear",
                           warmup_min_ratio=0.1, cos_min_ratio=0.1)
    sched.step(7)  # step 8 uses iteration 7
    assert s[8]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def expected_samples(ws: dict[str, str], block: int) -> int:
    import math

    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    (tok_dir,) = Path(ws["cache"]).glob("tokenizer-bpe512-*")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    shards = Path(ws["glob"]).parent

    def doc_len(text: str | None) -> int:
        if text is None or not text.strip():
            return 0  # skipped: no tokens, no separator
        return len(tok.encode(text, add_special_tokens=False).ids) + 1

    part_1 = pq.read_table(shards / "part_1.parquet")["text"].to_pylist()
    part_2 = pq.read_table(shards / "part_2.parquet")["text"].to_pylist()
    consumed = sum(map(doc_len, part_1)) + sum(map(doc_len, part_2[:10]))
    consumed += min(2 * block, doc_len(part_2[10]))
    return math.ceil(consumed / block)


def test_position_of_another_shard_list_is_not_translated(tmp_path: Path) -> None:
    from argonne_ds.convert.original import translate_position
    from argonne_ds.data.cache import ShardEntry

    entries = [ShardEntry(f"part_{i}.parquet", "", "", n_tokens=100) for i in (1, 2)]
    other = {**POSITION, "files_processed": ["part_1.parquet", "shard_9.parquet"]}
    samples, why = translate_position(other, entries, [], "text", None, 32, 10)
    assert samples is None and "does not match this list" in why and "shard_9" in why
    for bad, says in [({**POSITION, "current_file_idx": 5}, "this shard list has 2"),
                      ({**POSITION, "files_processed": 2}, "does not name the shards"),
                      ({**POSITION, "streaming": False}, "non-streaming mode"),
                      (None, "no data_position")]:
        samples, why = translate_position(bad, entries, [], "text", None, 32, 10)
        assert samples is None and says in why, why
