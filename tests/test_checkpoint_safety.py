"""Crash-safe checkpoints: a save is staged and published by a rename, so a job killed mid-save
resumes from the previous complete one; saving over a tag is safe; after a rollback the
abandoned branch's later checkpoints no longer win; a universal/ conversion is used only for the
save it was made from."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from argonne_ds.checkpoint import reshard
from argonne_ds.checkpoint import store as ckpt
from tests.train_helpers import read_metrics, run, start_job, steps, train_cmd


def _save(directory: Path, tag: str, payload: str) -> None:
    staged = directory / ckpt.staging_tag(tag)
    staged.mkdir(parents=True, exist_ok=True)
    (staged / "weights").write_text(payload)


def test_publish_replaces_a_tag_in_one_step(tmp_path: Path) -> None:
    _save(tmp_path, "global_step4", "first")
    assert ckpt.list_tags(tmp_path) == ([], [])  # a staged save is no candidate at all
    ckpt.publish(tmp_path, "global_step4", {"step": 4})
    assert ckpt.resume_candidates(tmp_path) == ["global_step4"]
    _save(tmp_path, "global_step4", "second")  # a rollback's branch saves the same tag
    assert (tmp_path / "global_step4" / "weights").read_text() == "first"
    ckpt.publish(tmp_path, "global_step4", {"step": 4})
    assert (tmp_path / "global_step4" / "weights").read_text() == "second"
    assert ckpt.read_marker(tmp_path / "global_step4")["tag"] == "global_step4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4"]
    # A save killed before it was published, and one killed while replacing: both cleaned up by
    # the next rotation, neither ever a resume candidate.
    _save(tmp_path, "global_step6", "killed")
    (tmp_path / "global_step2.replaced").mkdir()
    assert ckpt.resume_candidates(tmp_path) == ["global_step4"]
    assert sorted(ckpt.rotate(tmp_path, 3)) == ["global_step2.replaced", "global_step6.partial"]
    aside = ckpt.set_aside(tmp_path, ["global_step4"])
    assert ckpt.resume_candidates(tmp_path) == [] and (aside / "global_step4" / "weights").is_file()


def test_a_conversion_is_reused_only_for_its_own_save(tmp_path: Path) -> None:
    source = reshard.Source(tmp_path, "pipeline", 2, {}, stamp=1000.0)
    (tmp_path / reshard.UNIVERSAL).mkdir()
    done = tmp_path / reshard.UNIVERSAL / reshard.DONE
    done.write_text(json.dumps({"source_stamp": 1000.0}))
    assert reshard.converted(source)
    resaved = reshard.Source(tmp_path, "pipeline", 2, {}, stamp=2000.0)  # the tag saved again
    assert not reshard.converted(resaved)
    done.write_text(json.dumps({"source_mode": "pipeline"}))  # an older conversion: no stamp
    assert not reshard.converted(source)


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "6", "--save-interval", "2"))
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_during_a_save_resumes_from_the_previous_one(ws, reference: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "killed"
    ck = out / "checkpoints"
    cmd = train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "6", "--save-interval", "2")
    # Test hook: stall inside step 4's save, after every rank wrote its files, before publishing.
    job = start_job(cmd, {"ARGONNE_INJECT_SLOW_SAVE": "4:120"})
    deadline = time.monotonic() + 200
    try:
        staged = ck / ckpt.staging_tag("global_step4")
        while len(list(staged.glob("*optim_states.pt"))) < 2:  # both ranks' files written
            assert job.poll() is None and time.monotonic() < deadline, "no stalled save"
            time.sleep(0.1)
        time.sleep(1)
    finally:
        job.kill()  # the node dies mid-save (SIGKILL)
    ck = out / "checkpoints"
    assert staged.is_dir() and not (ck / "global_step4").exists()  # written, never visible
    assert ckpt.resume_candidates(ck) == ["global_step2"]
    res = run(cmd)
    assert "resumed from" in res.stdout and "global_step2: step 2" in res.stdout
    a, b = steps(reference), steps(out)
    assert all(b[s]["loss"] == a[s]["loss"] for s in range(1, 7))
    assert not list(ck.glob("*.partial")) and not list(ck.glob("*.replaced"))


@pytest.mark.distributed
@pytest.mark.slow
def test_rollback_sets_the_abandoned_branch_aside(ws, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "rollback"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("wandb"))
    ck = out / "checkpoints"
    assert ckpt.resume_candidates(ck)[:2] == ["global_step6", "global_step4"]
    # Back to step 2 with another learning rate: a new branch, which saves step 4 again.
    res = run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "4", "--save-interval", "2",
                        "--checkpoint-path", str(ck / "global_step2"), "--learning-rate",
                        "1e-3"))
    assert "later checkpoints global_step4, global_step6 of this run are set aside" in (
        res.stdout + res.stderr)
    (aside,) = ck.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["global_step4", "global_step6"]
    new4 = [r for r in read_metrics(out) if r.get("step") == 4 and "loss" in r][-1]
    assert new4["lr"] != steps(reference)[4]["lr"]
    # The next automatic resume continues the new branch, not the abandoned step 6.
    res = run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "5", "--save-interval", "2",
                        "--learning-rate", "1e-3"))
    assert "global_step4: step 4" in res.stdout
    assert ckpt.read_marker(ck / "global_step4")["run"]["train"]["learning_rate"] == 1e-3
