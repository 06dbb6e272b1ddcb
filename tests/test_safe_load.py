"""Files from elsewhere cannot run code: a pickle whose loading calls os.system is refused by
import-original, export and a resume from another run's checkpoint, in one line naming the file
and the type, and its payload does not run; --trust-pickle loads it on purpose."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from argonne_ds.cli import main
from argonne_ds.safe_load import UntrustedFileError, safe_load, verify_folder
from tests.test_import_original import original_checkpoint
from tests.train_helpers import MODEL


class Payload:
    """What a hostile checkpoint hides: unpickling it calls os.system."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch {self.mark}",)


def hostile(path: Path, mark: Path, **extra) -> Path:
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "note": Payload(mark), **extra}, path)
    return path


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    return err[-1]


def test_import_original_refuses_a_hostile_pickle(tmp_path: Path, capsys) -> None:
    mark = tmp_path / "payload-ran"
    f = hostile(tmp_path / "orig.pth", mark)
    assert main(["import-original", "--checkpoint", str(f), "--out", str(tmp_path / "hf")]) != 0
    line = one_line(capsys)
    assert str(f) in line and "posix.system" in line and "--trust-pickle" in line
    assert not mark.exists() and not (tmp_path / "hf").exists()
    # Trusted on purpose, the file is unpickled fully: the payload runs (then the import fails
    # on the weights, which do not fit).
    assert main(["import-original", "--checkpoint", str(f), "--out", str(tmp_path / "hf"),
                 "--trust-pickle"]) != 0
    assert mark.exists()


def test_a_real_original_checkpoint_loads_safely(tmp_path: Path) -> None:
    original_checkpoint(tmp_path / "orig.pth")  # tensors, numbers, strings, dicts, optimizer
    blob = safe_load(tmp_path / "orig.pth")
    assert blob["global_step"] == 7 and "optimizer_state_dict" in blob


def test_export_and_resume_refuse_a_hostile_checkpoint(tmp_path: Path, capsys) -> None:
    mark = tmp_path / "payload-ran"
    folder = tmp_path / "run" / "checkpoints" / "global_step4"
    folder.mkdir(parents=True)
    (folder / "argonne_complete.json").write_text(json.dumps(
        {"step": 4, "mode": "data_parallel", "model": MODEL, "world_size": 1}))
    hostile(folder / "mp_rank_00_model_states.pt", mark, module={})
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "hf")]) != 0
    line = one_line(capsys)
    assert "mp_rank_00_model_states.pt" in line and "posix.system" in line
    assert not mark.exists() and not (tmp_path / "hf").exists()
    # What the resume from another run's checkpoint (--checkpoint-path) runs before DeepSpeed's
    # load_checkpoint unpickles the folder.
    with pytest.raises(UntrustedFileError, match="posix.system"):
        verify_folder(folder)
    assert not mark.exists()


def test_deepspeed_optimizer_classes_are_allowed(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum.weights, "scaler": LossScaler(1.0),
                "state": {"exp_avg": torch.ones(3)}}, tmp_path / "optim_states.pt")
    blob = safe_load(tmp_path / "optim_states.pt", mmap=True, deepspeed_types=True)
    assert blob["zero_stage"] == ZeroStageEnum.weights and blob["scaler"].cur_scale == 1.0
    with pytest.raises(UntrustedFileError, match="ZeroStageEnum"):
        safe_load(tmp_path / "optim_states.pt")  # only where a DeepSpeed checkpoint is expected
