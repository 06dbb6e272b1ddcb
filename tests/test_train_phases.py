"""A run in phases, for real (2 and 4 CPU ranks, fp32): three sources blended by weight, a stable
phase then an anneal with the learning rate decaying. Killed with SIGKILL exactly at the phase
boundary and in the middle of the anneal, it resumes to bitwise the uninterrupted run; a 4-rank
ZeRO-3 gives the 2-stage pipeline's losses; a phase appended on resume gives what planning it
from the start gives; an anneal branched from a trunk checkpoint leaves the trunk untouched and
follows the formula."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from argonne_ds.checkpoint import store as ckpt
from argonne_ds.schedule import LRShape
from tests.train_helpers import (
    ROOT,
    read_metrics,
    run,
    run_expect_fail,
    run_until_step_then,
    start_job,
    steps,
    train_cmd,
    with_launcher,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
N, BOUNDARY = 12, 6  # the anneal starts after step 6; saves every 3 steps
STABLE = {"name": "stable", "start": 0}
ANNEAL = {"name": "anneal", "start": BOUNDARY, "weights": {"web": 0.2, "code": 0.0, "math": 0.8},
          "decay": "linear"}


def config(ws: dict[str, str], path: Path, phases: list[dict], max_repeats: float = 4,
           **train) -> Path:
    shards = Path(ws["glob"]).parent
    raw = {"data": {"sources": [
        {"name": "web", "data_glob": str(shards / "part_1.parquet"), "weight": 0.5},
        {"name": "code", "data_glob": [str(shards / "part_2.parquet")], "weight": 0.3},
        {"name": "math", "data_glob": str(shards / "part_10.parquet"), "weight": 0.2}],
        "max_repeats": max_repeats},
        "train": {"lr_schedule": "wsd", **train}, "phases": phases}
    path.write_text(yaml.safe_dump(raw))
    return path


def cmd(ws: dict[str, str], ds_config: str, out: Path, cfg: Path, *extra: str,
        ranks: int = 2) -> list[str]:
    c = train_cmd(ws, ds_config, out, "--config", str(cfg), "--global-batch-size", "8",
                  "--batch-size", "2", "--shuffle-window", "8", "--save-interval", "3",
                  "--max-steps", str(N), *extra)
    i = c.index("--data-glob")
    del c[i:i + 2]  # the sources replace it
    return with_launcher(c, num_gpus=str(ranks))


def kill_once_saved(command: list[str], out: Path, step: int, timeout: float = 240) -> None:
    """SIGKILL the job as soon as the checkpoint of `step` is published."""
    job = start_job(command)
    marker = out / ckpt.CHECKPOINTS / ckpt.tag_for(step) / ckpt.MARKER
    deadline = time.monotonic() + timeout
    try:
        while not marker.is_file():
            assert job.poll() is None, f"job ended before step {step}:\n{job.output()}"
            assert time.monotonic() < deadline, f"no checkpoint of step {step} in {timeout} s"
            time.sleep(0.02)
        job.kill()
    finally:
        job.kill()


def same_steps(a: Path, b: Path, keys=("loss", "lr", "data_crc", "samples")) -> None:
    sa, sb = steps(a), steps(b)
    assert sorted(sa) == sorted(sb) == list(range(1, N + 1))
    for step in sa:
        for key in keys:
            assert sa[step][key] == sb[step][key], (step, key, sa[step][key], sb[step][key])


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted 2-stage pipeline run in phases, and its run config."""
    root = tmp_path_factory.mktemp("phases")
    cfg = config(ws, root / "run.yaml", [STABLE, ANNEAL], max_repeats=0.25)
    out = root / "ref"
    proc = run(cmd(ws, "cpu_pipeline.json", out, cfg))
    log = proc.stdout + proc.stderr
    # 12 steps of 8 draw 48 of math's ~120 blocks: more than the (tiny) max_repeats.
    assert re.search(r"source 'math' will be read 0\.\d times over the plan", log)
    assert "source 'code' will be read" not in log
    assert "[plan] phase 'anneal': steps 7-12, LR decays linear" in log
    assert "[phase] step 7: phase 'anneal'" in log
    return out, cfg


def test_the_mixture_follows_its_weights_and_the_lr_its_formula(reference) -> None:
    out, _ = reference
    records = steps(out)
    shape = LRShape(3e-3, 3e-4, 3, BOUNDARY, N, "linear")
    for step, r in records.items():
        assert r["lr"] == pytest.approx(shape(step - 1), rel=1e-9)
        assert r["phase"] == ("stable" if step <= BOUNDARY else "anneal")
    # Realised shares within one sample of the weights (48 samples per phase).
    stable, anneal = records[BOUNDARY], records[N]
    for name, w in (("web", 0.5), ("code", 0.3), ("math", 0.2)):
        assert abs(stable[f"share/{name}"] * 48 - w * 48) < 1
        assert abs(anneal[f"share/{name}"] * 48 - ANNEAL["weights"][name] * 48) < 1
    assert anneal["tokens/code"] == stable["tokens/code"]  # weight 0: nothing more drawn
    assert sum(anneal[f"tokens/{n}"] for n in ("web", "code", "math")) == N * 8 * 32
    assert records[N]["loss"] < records[1]["loss"]
    events = [r for r in read_metrics(out) if r.get("event") == "phase"]
    assert [(e["step"], e["phase"]) for e in events] == [(1, "stable"), (7, "anneal")]
    marker = json.loads((out / "checkpoints" / "global_step12" / ckpt.MARKER).read_text())
    assert marker["run"]["train"]["phases"][1]["name"] == "anneal"


def test_sigkill_at_the_phase_boundary_and_mid_phase_resume_exactly(ws, reference,
                                                                     tmp_path: Path) -> None:
    ref, cfg = reference
    at_boundary, mid = tmp_path / "boundary", tmp_path / "mid"
    kill_once_saved(cmd(ws, "cpu_pipeline.json", at_boundary, cfg), at_boundary, BOUNDARY)
    out = run(cmd(ws, "cpu_pipeline.json", at_boundary, cfg)).stdout
    assert f"resumed from {at_boundary / 'checkpoints'}/global_step{BOUNDARY}" in out
    same_steps(ref, at_boundary)
    code, _ = run_until_step_then(cmd(ws, "cpu_pipeline.json", mid, cfg), mid, 10,
                                  signal.SIGKILL)
    assert code != 0 and max(steps(mid)) < N
    out = run(cmd(ws, "cpu_pipeline.json", mid, cfg)).stdout
    assert f"resumed from {mid / 'checkpoints'}/global_step9" in out
    same_steps(ref, mid)


def test_zero3_on_4_ranks_gives_the_pipelines_losses(ws, reference, tmp_path: Path) -> None:
    ref, cfg = reference
    out = tmp_path / "z3"
    run(cmd(ws, "cpu_zero3.json", out, cfg, ranks=4))
    a, b = steps(ref), steps(out)
    for step in range(1, N + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-5), step
        assert b[step]["samples"] == a[step]["samples"]
        assert b[step]["tokens/math"] == a[step]["tokens/math"]


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        h.update(f"{p.relative_to(folder)} {st.st_size} {st.st_mtime_ns}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_a_phase_appended_on_resume_and_an_anneal_branch(ws, reference, tmp_path: Path) -> None:
    ref, _ = reference
    trunk = tmp_path / "trunk"
    stable_only = config(ws, tmp_path / "stable.yaml", [STABLE], decay_steps=0)
    run(cmd(ws, "cpu_pipeline.json", trunk, stable_only, "--max-steps", str(BOUNDARY)))
    # Appended: the anneal (and the longer budget) added when the trunk is resumed.
    appended = tmp_path / "appended"
    import shutil

    shutil.copytree(trunk, appended)
    both = config(ws, tmp_path / "both.yaml", [STABLE, ANNEAL])
    out = run(cmd(ws, "cpu_pipeline.json", appended, both)).stdout
    assert f"global_step{BOUNDARY}" in out and "[phase] step 7: phase 'anneal'" in out
    same_steps(ref, appended)
    # A branch from the trunk's step-3 checkpoint: an anneal of 3 steps into its own folder.
    before = tree_digest(trunk)
    early = {**ANNEAL, "start": 3, "decay": "1-sqrt"}
    branch_cfg = config(ws, tmp_path / "branch.yaml", [STABLE, early])
    branch = tmp_path / "branch"
    source = trunk / "checkpoints" / "global_step3"
    args = ("--checkpoint-path", str(source), "--max-steps", "6")
    out = run(cmd(ws, "cpu_pipeline.json", branch, branch_cfg, *args)).stdout
    assert f"a branch of {source.resolve()} at step 3" in out
    assert tree_digest(trunk) == before  # the trunk is only read
    records = steps(branch)
    assert sorted(records) == [4, 5, 6]
    shape = LRShape(3e-3, 3e-4, 3, 3, 6, "1-sqrt")
    for step, r in records.items():
        assert r["lr"] == pytest.approx(shape(step - 1), rel=1e-9)
        assert r["phase"] == "anneal"
    trunk_steps = steps(trunk)
    assert records[4]["samples"] == trunk_steps[4]["samples"]  # the data continues at step 3
    marker = json.loads((branch / "checkpoints" / "global_step6" / ckpt.MARKER).read_text())
    assert marker["branch"] == {"trunk": str(source.resolve()), "step": 3}
    resolved = json.loads((branch / "resolved_config.json").read_text())
    assert resolved["branch"]["trunk"] == str(source.resolve())
    # Relaunched with the same command, the branch resumes its own checkpoint, not the trunk.
    out = run(cmd(ws, "cpu_pipeline.json", branch, branch_cfg, *args)).stdout
    assert f"resuming {branch / 'checkpoints'}/global_step6, not the trunk" in out
    assert tree_digest(trunk) == before


def test_a_bad_source_stops_before_anything_is_written(ws, tmp_path: Path) -> None:
    cfg = config(ws, tmp_path / "run.yaml", [STABLE, {**ANNEAL, "weights": {"books": 1}}])
    out = tmp_path / "out"
    proc = run_expect_fail(cmd(ws, "cpu_pipeline.json", out, cfg, ranks=1))
    assert "phase 'anneal' names source 'books', which data.sources does not define" in proc
    assert not out.exists()


def test_the_example_config_runs_on_the_sample_corpus(tmp_path: Path) -> None:
    """launch/configs/phases.yaml: the embedded sample's shards as four sources, a stable phase
    and an anneal, prepared (`prepare --config`) and trained for a few steps on 2 ranks."""
    from argonne_ds.cli import main

    example = ROOT / "launch" / "configs" / "phases.yaml"
    raw = yaml.safe_load(example.read_text())
    assert [p["name"] for p in raw["phases"]] == ["stable", "anneal"]
    assert len(raw["data"]["sources"]) >= 2
    cache = tmp_path / "cache"
    assert main(["prepare", "--config", str(example), "--cache-dir", str(cache),
                 "--fallback-vocab-size", "512", "--no-progress"]) == 0
    out = tmp_path / "out"
    anneal = 4  # the shipped phases, the anneal moved up to step 4 (phases are not flags)
    raw["phases"][1]["start"] = anneal
    short = tmp_path / "phases.yaml"
    short.write_text(yaml.safe_dump(raw))
    proc = run(with_launcher(["<local ranks>", "2", "train", "--config", str(short),
                              "--cache-dir", str(cache), "--fallback-vocab-size", "512",
                              "--output-dir", str(out), "--max-steps", str(anneal + 2),
                              "--save-interval", "1000", "--eval-interval", str(anneal + 2),
                              "--log-interval", "1"], num_gpus="2"), cwd=ROOT)
    assert f"[phase] step {anneal + 1}: phase 'anneal'" in proc.stdout
    records = steps(out)
    names = [s["name"] for s in raw["data"]["sources"]]
    assert all(f"tokens/{n}" in records[anneal + 2] for n in names)
    evals = [r for r in read_metrics(out) if r.get("event") == "eval"]
    assert any(k.startswith("eval_loss/") for k in evals[-1])
