"""launch/train.sh relaunches a job that hung or ran out of memory, for real on 2 CPU ranks: the
watchdog prints every rank's stack and exits 75; an out-of-memory error inside one pipeline
stage's forward or inside ZeRO-3's backward (one rank only, the others left waiting in a
collective) exits 75 with half the micro-batch recorded; the relaunch resumes from the last
checkpoint and the run ends with the losses and data of an uninterrupted one. What is not
relaunched: out of memory at the smallest micro-batch (exit 3)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from argonne_ds.reliability import BACKOFF_FILE
from argonne_ds.reliability.faults import HANG_ENV, OOM_ENV
from tests.train_helpers import LAUNCH, finish, make_workspace, start, steps, tiny_job, train_sh

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TIMEOUT = 300
STEPS = {"MAX_STEPS": "6", "SAVE_INTERVAL": "2", "RESTART_DELAY": "1"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_workspace(tmp_path_factory.mktemp("relaunch"))


def train(ws: dict[str, str], config: str, out: Path, *flags: str, **variables: str
          ) -> tuple[int, str]:
    """train.sh on this machine's 2 ranks; (exit code, log)."""
    log = out.with_suffix(".log")
    job = tiny_job(ws, out, HOSTFILE="", NUM_GPUS="2", **STEPS, **variables)
    code = finish([start(train_sh(config) + list(flags), job, log)],
                  time.monotonic() + TIMEOUT)[0]
    return code, log.read_text()


@pytest.fixture(scope="module")
def references(ws, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted 6-step runs, one per layout."""
    out = {}
    for config in ("cpu_pipeline.json", "cpu_zero3.json"):
        out[config] = tmp_path_factory.mktemp("ref") / "run"
        code, log = train(ws, config, out[config])
        assert code == 0, log[-3000:]
    return out


def test_a_hang_prints_every_stack_and_is_relaunched(ws, references, tmp_path: Path) -> None:
    out = tmp_path / "hang"
    code, log = train(ws, "cpu_pipeline.json", out, "--step-timeout", "8", MAX_RESTARTS="1",
                      **{HANG_ENV: "5@1"})
    assert code == 0, log[-4000:]
    for rank in (0, 1):
        assert f"[watchdog] rank {rank}: step 5 has not finished after 8 s" in log
    stacks = {r: [line for line in log.splitlines() if line.startswith(f"[rank {r}] ")]
              for r in (0, 1)}
    assert any("faults.py" in line and "in begin" in line for line in stacks[1])  # where it hangs
    assert any("in send" in line or "in recv" in line for line in stacks[0])  # waiting for it
    assert "[launch] the job exited 75" in log and "relaunch 1 of 1" in log
    assert "resumed from" in log and "global_step4: step 4" in log
    a, b = steps(references["cpu_pipeline.json"]), steps(out)
    assert sorted(b) == list(range(1, 7))
    assert all(b[s]["loss"] == a[s]["loss"] and b[s]["data_crc"] == a[s]["data_crc"]
               for s in a)


@pytest.mark.parametrize(("config", "where", "rank", "compiled"), [
    # the last stage fails inside its torch.compile'd blocks, the first waits in a send (the
    # fault hook runs eagerly either way: this case holds the uncompiled one too)
    ("cpu_pipeline.json", "forward", 1, True),
    ("cpu_zero3.json", "backward", 0, False),  # one rank fails in backward, the other reduces
], ids=["compiled-pipeline-forward", "zero3-backward"])
def test_an_oom_inside_one_rank_is_relaunched_at_half_the_micro_batch(
        ws, references, tmp_path: Path, config: str, where: str, rank: int,
        compiled: bool) -> None:
    out = tmp_path / "oom"
    json_path = config
    if compiled:
        ds = json.loads((LAUNCH.parent / "ds_configs" / config).read_text())
        # aot_eager: Dynamo and AOT autograd wrap the error as with inductor, without the
        # C++ builds of two cold launches (inductor's parity: test_scale_out, test_compile)
        ds["torch_compile"] = {"enabled": True, "backend": "aot_eager"}
        json_path = str(tmp_path / "compiled.json")
        Path(json_path).write_text(json.dumps(ds))
    code, log = train(ws, json_path, out, MAX_RESTARTS="1", **{OOM_ENV: f"{where}:3@{rank}"})
    if compiled:  # both launches compiled, and said how long it took
        assert log.count("[compile] torch.compile (aot_eager) of ") == 2, log[-3000:]
    assert code == 0, log[-4000:]
    assert f"rank {rank} ran out of memory in step 3 at micro-batch 4" in log
    assert "relaunch 1 of 1" in log and "micro-batch 2, not 4" in log
    assert json.loads((out / BACKOFF_FILE).read_text())["micro_batch_size"] == 2
    a, b = steps(references[config]), steps(out)
    assert sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert b[s]["micro_batch"] == (4 if s < 3 else 2)
        assert b[s]["data_crc"] == a[s]["data_crc"]  # the same blocks in the same steps
        assert b[s]["tokens"] == a[s]["tokens"]  # the same global batch
        # The same model; only the summation order of the micro-batches differs.
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5, abs=1e-5)


def test_an_oom_at_the_smallest_micro_batch_is_not_relaunched(ws, tmp_path: Path) -> None:
    out = tmp_path / "floor"
    code, log = train(ws, "cpu_pipeline.json", out, "--min-micro-batch-size", "4",
                      MAX_RESTARTS="3", **{OOM_ENV: "step:2"})
    assert code == 3, log[-4000:]
    assert "out of memory at micro-batch 4, the floor (--min-micro-batch-size 4)" in log
    assert "[launch] the job exited" not in log and "Traceback" not in log
    assert not (out / BACKOFF_FILE).exists()
