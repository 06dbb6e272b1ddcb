"""The job under stress, for real through the deepspeed launcher on 2 CPU ranks: preemption
signals, a corrupt or partial latest checkpoint, an incompatible checkpoint, and what
the job reports (metrics file, eval, samples, wandb run id)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from argonne_ds.checkpoint import store as ckpt
from tests.train_helpers import (
    read_metrics,
    run,
    run_until_step_then,
    steps,
    train_cmd,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]



@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 10-step ZeRO-3 run with eval and samples, checkpoints every 4."""
    out = tmp_path_factory.mktemp("ref")
    run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "10", "--save-interval", "4",
                  "--eval-interval", "5", "--eval-data-glob", ws["glob"], "--sample-interval",
                  "5", "--sample-tokens", "8"))
    return out


def test_metrics_eval_sample_and_rotation(reference: Path) -> None:
    s = steps(reference)
    assert sorted(s) == list(range(1, 11))
    for row in s.values():
        assert {"loss", "lr", "grad_norm", "tokens", "samples", "epoch", "data_crc"} <= set(row)
        assert len(row["data_crc"]) == 2 and row["grad_norm"] is not None
    assert s[10]["tokens"] == 10 * (4 * 2 * 2) * 32  # steps x (micro x accum x ranks) x T
    events = [r.get("event") for r in read_metrics(reference)]
    assert events.count("eval") == 2 and events.count("sample") == 2
    complete, _ = ckpt.list_tags(reference / "checkpoints")
    assert complete == ["global_step4", "global_step8", "global_step10"]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_saves_and_exits_zero(ws, reference: Path, tmp_path: Path,
                                                sig: int) -> None:
    out = tmp_path / "preempt"
    cmd = train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "10", "--save-interval", "100")
    code, output = run_until_step_then(cmd, out, 3, sig, ranks_only=True)
    assert code == 0, output[-3000:]  # every rank exited 0, so the launcher did too
    assert "stop signal received" in output
    complete, _ = ckpt.list_tags(out / "checkpoints")
    assert len(complete) == 1 and ckpt.step_of(complete[0]) < 10
    stopped_at = ckpt.step_of(complete[0])
    res = run(cmd)
    assert f"global_step{stopped_at}: step {stopped_at}" in res.stdout
    a, b = steps(reference), steps(out)
    assert sorted(b) == list(range(1, 11))
    assert all(b[s]["loss"] == a[s]["loss"] and b[s]["data_crc"] == a[s]["data_crc"]
               for s in range(1, 11))


def test_corrupt_and_partial_latest_fall_back(ws, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "corrupt"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("wandb"))
    ck = out / "checkpoints"
    (ck / "global_step10" / ckpt.MARKER).unlink()  # partial: a save that never finished
    for f in (ck / "global_step8").glob("*model_states.pt"):  # corrupt: garbage bytes
        f.write_bytes(b"not a checkpoint")
    res = run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "10", "--save-interval", "4"))
    assert "global_step10 is incomplete" in res.stderr + res.stdout
    assert "could not load checkpoint" in res.stderr + res.stdout
    assert "resumed from" in res.stdout and "global_step4: step 4" in res.stdout
    a, b = steps(reference), steps(out)
    assert all(b[s]["loss"] == a[s]["loss"] for s in range(5, 11))


def test_incompatible_checkpoint_is_one_clear_message(ws, reference: Path,
                                                      tmp_path: Path) -> None:
    import json

    out = tmp_path / "other"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("wandb"))
    bigger = json.loads(Path(ws["model"]).read_text()) | {"hidden_size": 96}
    (tmp_path / "m.json").write_text(json.dumps(bigger))
    cmd = train_cmd({**ws, "model": str(tmp_path / "m.json")}, "cpu_zero3.json", out,
                    "--max-steps", "12")
    with pytest.raises(AssertionError) as err:
        run(cmd)
    assert "holds a different model" in str(err.value) and "hidden_size" in str(err.value)


def test_wandb_run_continues_after_resume(ws, tmp_path: Path) -> None:
    out = tmp_path / "wb"
    common = ("--max-steps", "4", "--save-interval", "2")
    run(train_cmd(ws, "cpu_zero3.json", out, *common))
    run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "6", "--save-interval", "2"))
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.rsplit("-", 1)[1] for r in runs}) == 1, runs
