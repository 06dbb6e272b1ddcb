"""Saves written in the background (checkpoint.async_save, the default): the loop goes on while
the files are written, the checkpoint is published only once every rank's files are on disk, a
kill -9 during the write leaves the previous checkpoint the newest, and a SIGTERM during one
waits for it, saves, and exits 0 — both resume to bitwise the uninterrupted run's losses."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from argonne_ds.checkpoint import store as ckpt
from tests.train_helpers import read_metrics, run, steps, train_cmd

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
N, SAVE = 14, 4
COMMON = ("--max-steps", str(N), "--save-interval", str(SAVE))


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("async") / "ref"
    log = run(train_cmd(ws, "cpu_pipeline.json", out, *COMMON)).stdout
    assert "step 4: state copied in" in log and "writing global_step4.partial in the background" \
        in log
    return out


def same(a: Path, b: Path) -> None:
    sa, sb = steps(a), steps(b)
    assert sorted(sa) == sorted(sb) == list(range(1, N + 1))
    for step in sa:
        for key in ("loss", "lr", "data_crc"):
            assert sa[step][key] == sb[step][key], (step, key)


def test_sigkill_during_a_background_write_resumes_exactly(ws, reference, tmp_path: Path
                                                           ) -> None:
    out = tmp_path / "run"
    # The write of step 8 takes a minute; training goes on meanwhile and is killed at step 10.
    cmd = train_cmd(ws, "cpu_pipeline.json", out, *COMMON)
    code, _ = run_until_step_then_env(cmd, out, 10, signal.SIGKILL,
                                      {"ARGONNE_INJECT_SLOW_WRITE": "8:60"})
    assert code != 0
    assert max(steps(out)) >= 10  # the loop was not blocked by the write in flight
    complete, incomplete = ckpt.list_tags(out / "checkpoints")
    assert complete == ["global_step4"]  # step 8 never published
    log = run(train_cmd(ws, "cpu_pipeline.json", out, *COMMON)).stdout
    assert f"resumed from {out / 'checkpoints'}/global_step4" in log
    same(reference, out)


def test_sigterm_during_a_background_write_waits_saves_and_exits_zero(ws, reference,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(ws, "cpu_pipeline.json", out, *COMMON)
    code, log = run_until_step_then_env(cmd, out, 10, signal.SIGTERM,
                                        {"ARGONNE_INJECT_SLOW_WRITE": "8:4"})
    assert code == 0, log[-3000:]
    stopped = max(steps(out))
    complete, _ = ckpt.list_tags(out / "checkpoints")
    assert "global_step8" in complete and complete[-1] == f"global_step{stopped}"
    published = [r for r in read_metrics(out) if r.get("event") == "checkpoint"]
    assert [r["step"] for r in published][:2] == [4, 8]
    log = run(train_cmd(ws, "cpu_pipeline.json", out, *COMMON)).stdout
    assert f"resumed from {out / 'checkpoints'}/global_step{stopped}" in log
    same(reference, out)


def run_until_step_then_env(cmd, out, step, sig, extra_env):
    """train_helpers.run_until_step_then with the fault hooks' environment."""
    from argonne_ds.testing import start_local
    from tests.train_helpers import _local_until_step_then, _log_dir, env

    job = start_local(cmd[2:], _log_dir(), int(cmd[1]), env(extra_env))
    return _local_until_step_then(job, out, step, sig, 240)
