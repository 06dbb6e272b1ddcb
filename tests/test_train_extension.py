"""A context extension for real (2 CPU ranks, fp32, a 2-stage pipeline): two sources trained at
32-token blocks, then a phase at 64 tokens with YaRN RoPE. The first launch saves at the phase's
start and exits 76 (Exit.NEXT_PHASE); the next launch builds the 64-token model and continues
with the same tokens per step. Killed with SIGKILL inside the new phase, the job resumes to
bitwise the uninterrupted run; a started extension phase cannot change, and neither can the
context outside a phase."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from argonne_ds.checkpoint import store as ckpt
from tests.train_helpers import (
    read_metrics,
    run,
    run_expect_fail,
    run_until_step_then,
    steps,
    train_cmd,
    with_launcher,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
N, BOUNDARY = 8, 4  # 64-token blocks from step 5; saves every 2 steps
SHORT = {"name": "short", "start": 0}
LONG = {"name": "long", "start": BOUNDARY, "block_size": 64,
        "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
NEXT_PHASE = 76


def config(ws: dict[str, str], path: Path, phases: list[dict]) -> Path:
    shards = Path(ws["glob"]).parent
    raw = {"data": {"sources": [
        {"name": "web", "data_glob": str(shards / "part_1.parquet"), "weight": 0.6},
        {"name": "code", "data_glob": str(shards / "part_2.parquet"), "weight": 0.4}]},
        "phases": phases}
    path.write_text(yaml.safe_dump(raw))
    return path


def cmd(ws: dict[str, str], out: Path, cfg: Path, *extra: str) -> list[str]:
    c = train_cmd(ws, "cpu_pipeline.json", out, "--config", str(cfg), "--global-batch-size",
                  "8", "--batch-size", "2", "--shuffle-window", "8", "--save-interval", "2",
                  "--max-steps", str(N), "--eval-interval", "4", "--eval-data-glob",
                  str(Path(ws["glob"]).parent / "part_10.parquet"), *extra)
    i = c.index("--data-glob")
    del c[i:i + 2]  # the sources replace it
    return with_launcher(c, num_gpus="2")


def same_steps(a: Path, b: Path) -> None:
    sa, sb = steps(a), steps(b)
    assert sorted(sa) == sorted(sb) == list(range(1, N + 1))
    for step in sa:
        for key in ("loss", "lr", "data_crc", "samples", "tokens"):
            assert sa[step][key] == sb[step][key], (step, key, sa[step][key], sb[step][key])


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory) -> tuple[Path, Path, Path, list[str]]:
    """The run through both phases (two launches), a copy of it at the boundary, its config,
    and the two launches' logs."""
    root = tmp_path_factory.mktemp("extension")
    cfg = config(ws, root / "run.yaml", [SHORT, LONG])
    out, boundary = root / "ref", root / "boundary"
    first = run(cmd(ws, out, cfg), codes=(NEXT_PHASE,))
    shutil.copytree(out, boundary)
    second = run(cmd(ws, out, cfg))
    return out, boundary, cfg, [first.stdout + first.stderr, second.stdout + second.stderr]


def test_the_extension_relaunches_with_the_new_context(reference) -> None:
    out, _, _, (first, second) = reference
    assert f"phase 'long' trains with 64-token blocks x 4 from step {BOUNDARY + 1}" in first
    assert "[phase] step 4 saved" in first
    assert f"resumed from {out / 'checkpoints'}/global_step{BOUNDARY}" in second
    assert "phase 'short' context until step 4: blocks of 32 tokens, global batch 8 (256 " \
        "tokens a step), RoPE the model's" in first
    assert "phase 'long' context: blocks of 64 tokens, global batch 4 (256 tokens a step), " \
        "RoPE yarn (factor 2.0)" in second
    assert "[plan] phase 'long': steps 5-8, 64-token blocks" in second
    records = steps(out)
    assert sorted(records) == list(range(1, N + 1))
    # The same tokens per step: 8 x 32, then 4 x 64; the samples count 8, then 4, a step.
    assert [records[s]["tokens"] for s in records] == [256 * s for s in range(1, N + 1)]
    assert records[BOUNDARY]["samples"] == 8 * BOUNDARY
    assert records[N]["samples"] == 8 * BOUNDARY + 4 * (N - BOUNDARY)
    assert sum(records[N][f"tokens/{n}"] for n in ("web", "code")) == 256 * N
    assert all(r["loss"] == r["loss"] for r in records.values())  # finite (not NaN)
    marker = json.loads((out / "checkpoints" / ckpt.tag_for(N) / ckpt.MARKER).read_text())
    assert marker["model"]["max_position_embeddings"] == 64
    assert marker["model"]["rope_parameters"] == {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
        "rope_theta": 500000.0}
    early = json.loads((out / "checkpoints" / ckpt.tag_for(BOUNDARY) / ckpt.MARKER).read_text())
    assert early["model"]["rope_parameters"]["rope_type"] == "default"
    # The held-out loss by position, at each phase's block size: 32 tokens, then 64.
    evals = {r["step"]: r for r in read_metrics(out) if r.get("event") == "eval"}
    assert [k for k in evals[4] if "_pos/" in k] == [
        f"eval_loss_pos/{s}" for s in ("0-3", "4-7", "8-15", "16-31")]
    assert [k for k in evals[8] if "_pos/" in k] == [
        f"eval_loss_pos/{s}" for s in ("0-7", "8-15", "16-31", "32-63")]


def test_sigkill_inside_the_new_phase_resumes_exactly(ws, reference, tmp_path: Path) -> None:
    ref, boundary, cfg, _ = reference
    mid = tmp_path / "mid"
    shutil.copytree(boundary, mid)  # the first launch's files: saved at step 4, exited 76
    code, _ = run_until_step_then(cmd(ws, mid, cfg), mid, 7, signal.SIGKILL)
    assert code != 0 and max(steps(mid)) < N
    out = run(cmd(ws, mid, cfg)).stdout
    assert f"resumed from {mid / 'checkpoints'}/global_step6" in out
    same_steps(ref, mid)


def test_a_started_extension_and_the_context_outside_a_phase_cannot_change(
        ws, reference, tmp_path: Path) -> None:
    ref, boundary, cfg, _ = reference
    out = tmp_path / "changed"
    shutil.copytree(ref, out)
    longer = config(ws, tmp_path / "longer.yaml", [SHORT, {**LONG, "block_size": 128}])
    err = run_expect_fail(cmd(ws, out, longer, "--max-steps", str(N + 2)))
    assert "was trained with another context than this run gives step 8" in err
    assert "'max_position_embeddings': (64, 128)" in err and "a started phase" in err
    theta = tmp_path / "theta.json"
    model = json.loads(Path(ws["model"]).read_text())
    theta.write_text(json.dumps({**model, "rope_theta": 10000.0}))
    shutil.rmtree(out)
    shutil.copytree(boundary, out)  # step 4, still in the short phase
    err = run_expect_fail(cmd(ws, out, cfg, "--model", str(theta)))
    assert "than this run gives step 4" in err and "not in the model config" in err
    assert steps(out) == steps(boundary)  # nothing trained, nothing written
