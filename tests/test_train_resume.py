"""The core reliability figure: a job killed with SIGKILL after a checkpoint and resumed produces
exactly the losses and consumes exactly the blocks of an uninterrupted run (CPU, fp32, 2 ranks,
through the real deepspeed launcher), for pipeline (2 stages) and ZeRO-3."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from argonne_ds.checkpoint import store as ckpt
from tests.train_helpers import run, run_until_step_then, steps, train_cmd

N, SAVE = 14, 4



@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["cpu_pipeline.json", "cpu_zero3.json"])
def test_sigkill_then_resume_is_exact(ws, tmp_path: Path, ds_config: str) -> None:
    common = ("--max-steps", str(N), "--save-interval", str(SAVE), "--shuffle-window", "8")
    a, b = tmp_path / "a", tmp_path / "b"
    run(train_cmd(ws, ds_config, a, *common))
    kill_at = random.Random().randint(SAVE + 1, N - 2)
    print(f"killing run B at step >= {kill_at}")
    code, _ = run_until_step_then(train_cmd(ws, ds_config, b, *common), b, kill_at,
                                  signal.SIGKILL)
    assert code != 0
    killed_at = max(steps(b))
    assert killed_at < N, "the job finished before it could be killed"
    complete, _ = ckpt.list_tags(b / "checkpoints")
    resumed_from = ckpt.step_of(complete[-1])
    assert SAVE <= resumed_from <= killed_at
    out = run(train_cmd(ws, ds_config, b, *common)).stdout
    assert f"resumed from {b / 'checkpoints'}/global_step{resumed_from}" in out
    sa, sb = steps(a), steps(b)
    assert sorted(sa) == sorted(sb) == list(range(1, N + 1))
    for step in range(1, N + 1):
        # Bitwise: the same losses, learning rates and blocks (crc32 of every rank's tokens).
        for key in ("loss", "lr", "data_crc", "samples"):
            assert sa[step][key] == sb[step][key], (step, key, sa[step][key], sb[step][key])
    assert sa[N]["loss"] < sa[1]["loss"]  # it learns: the comparison is not between constants


def test_a_resume_is_told_to_skip_the_initial_weights(tmp_path: Path) -> None:
    """The trainer asks for no initial weights exactly when a checkpoint is there to resume, and
    knows its step before the engine is built (a context phase picks the model by it)."""
    from argonne_ds.checkpoint.store import resume_step_of

    out = str(tmp_path)
    assert resume_step_of(out, None) is None
    for step in (4, 10):
        (tmp_path / "checkpoints" / f"global_step{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"global_step{step}" / "argonne_complete.json").write_text("{}")
    assert resume_step_of(out, None) == 10
    assert resume_step_of(out, str(tmp_path / "checkpoints" / "global_step4")) == 4
    other = tmp_path / "other"
    assert resume_step_of(str(other), str(tmp_path / "checkpoints")) == 10  # a branch's trunk
    assert resume_step_of(str(other), str(tmp_path / "nothing")) == 0  # refused on resume
