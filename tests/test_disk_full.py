"""A full disk stops the job cleanly: the save that does not fit ends the job with exit 5 (not
relaunched) and one line naming the folder, the bytes needed and free and the newest intact
checkpoint; the partial save is removed; a relaunch on the still-full disk stops at the start
before training steps it could not save; once there is room, the resume is bitwise the
uninterrupted run. For real on a small tmpfs (where this machine lets the test mount one), and
with an injected ENOSPC everywhere."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from argonne_ds.checkpoint import space
from argonne_ds.checkpoint import store as ckpt
from argonne_ds.reliability.exits import Exit
from argonne_ds.testing import run_local
from tests.train_helpers import _log_dir, env, run, steps, train_cmd

N = 6
COMMON = ("--max-steps", str(N), "--save-interval", "2")


def job(cmd: list[str], extra_env: dict | None = None):
    """A local job whose exit code is looked at (run() asserts 0)."""
    return run_local(cmd[2:], _log_dir(), int(cmd[1]), env(extra_env), 240, None)


def mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def the_line(output: str, text: str) -> str:
    lines = [line for line in output.splitlines() if text in line]
    assert lines, f"no line with {text!r} in:\n{output[-3000:]}"
    return lines[-1]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["cpu_pipeline.json", "cpu_zero3.json"])
def test_a_disk_that_fills_up_stops_the_job_and_loses_nothing(ws, tmp_path: Path,
                                                              ds_config: str) -> None:
    ref = tmp_path / "ref"
    run(train_cmd(ws, ds_config, ref, *COMMON))
    one = space.folder_bytes(ref / "checkpoints" / "global_step2")
    rest = space.folder_bytes(ref) - space.folder_bytes(ref / "checkpoints")
    mnt = tmp_path / "small"
    # Room for the first checkpoint, the logs and half a checkpoint more.
    if not mount_tmpfs(mnt, one + rest + one // 2):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "run"
        first = job(train_cmd(ws, ds_config, out, *COMMON))
        assert first.returncode == Exit.DISK_FULL, first.stdout[-3000:]
        line = the_line(first.stdout + first.stderr, "could not be written")
        assert f"the checkpoint of step 4 could not be written: {out / 'checkpoints'} is full" \
            in line
        assert "a save needs" in line and "free after removing the partial save" in line
        assert f"newest intact checkpoint is {out / 'checkpoints' / 'global_step2'}" in line
        assert "Traceback" not in first.stdout + first.stderr
        complete, incomplete = ckpt.list_tags(out / "checkpoints")
        assert complete == ["global_step2"] and not incomplete  # the partial save is gone
        assert "fewer than two checkpoint" in first.stdout + first.stderr  # the warning at start
        trained = max(steps(out))  # 4, or 5 when the write failed in the background during it
        assert trained in (4, 5)
        # Relaunched on the full disk: it stops before training a step it could not save.
        again = job(train_cmd(ws, ds_config, out, *COMMON))
        assert again.returncode == Exit.DISK_FULL
        assert "not starting steps that could not be saved" in again.stdout + again.stderr
        assert max(steps(out)) == trained  # no step trained by the relaunch
        # Room again: the run resumes from step 2 and ends as if nothing had happened.
        subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
        log = run(train_cmd(ws, ds_config, out, *COMMON)).stdout
        assert f"resumed from {out / 'checkpoints'}/global_step2" in log
        a, b = steps(ref), steps(out)
        for step in range(1, N + 1):
            for key in ("loss", "lr", "data_crc"):
                assert a[step][key] == b[step][key], (step, key)
    finally:
        unmount(mnt)


@pytest.mark.distributed
def test_an_enospc_at_the_save_is_one_line_and_exit_5(ws, tmp_path: Path) -> None:
    """The same path without a tmpfs: the save of step 2 fails with ENOSPC mid-write."""
    out = tmp_path / "run"
    proc = job(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "2", "--save-interval", "2"),
               {"ARGONNE_INJECT_DISK_FULL": "2"})
    assert proc.returncode == Exit.DISK_FULL, proc.stdout[-3000:]
    line = the_line(proc.stdout + proc.stderr, "could not be written")
    assert f"{out / 'checkpoints'} is full" in line and "newest intact checkpoint is none" in line
    assert ckpt.list_tags(out / "checkpoints") == ([], [])
    assert not list((out / "checkpoints").glob("*partial*"))


def test_what_counts_as_a_disk_problem(tmp_path: Path, monkeypatch) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
    wrapped.__cause__ = full
    assert space.disk_problem(wrapped, tmp_path, 10) == "full"
    assert space.disk_problem(OSError(errno.EDQUOT, "quota"), tmp_path, 10) == "over its quota"
    assert space.disk_problem(OSError(errno.EROFS, "ro"), tmp_path, 10) == "read-only"
    # torch's writer often raises without an errno: then the folder's free space decides.
    bare = RuntimeError("basic_ios::clear: iostream error")
    assert space.disk_problem(bare, tmp_path, 10) is None  # plenty of room here: not the disk
    monkeypatch.setattr(space, "free_bytes", lambda folder: 4096)
    assert space.disk_problem(bare, tmp_path, 10**9) == "full"
    assert space.disk_problem(ValueError("x"), tmp_path, 10**9) == "full"  # a full disk is why
