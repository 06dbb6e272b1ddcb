"""The bad-step guard: the window logic on its own, then for real on 2 CPU ranks in each layout
(pipeline fp32 = ZeRO-1, pipeline bf16 = DeepSpeed's BF16_Optimizer, ZeRO-3): a NaN loss and a
spike are skipped, leave every saved tensor (weights, fp32 masters, Adam moments and step count)
bitwise as it was, consume their data, and the run goes on exactly as one told to skip those
steps; too many in a row stop the job with exit 4 and a way out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from argonne_ds.reliability import Exit, JobError
from argonne_ds.reliability.faults import LOSS_ENV
from argonne_ds.reliability.guard import BadStepGuard, parse_steps
from argonne_ds.testing import free_port
from tests.train_helpers import ROOT, make_workspace, run, steps, train_cmd, with_launcher

SAVE_EVERY_STEP = ("--max-steps", "9", "--save-interval", "1", "--checkpoint-keep", "0")


# ---- the rule -----------------------------------------------------------------------------------


def test_parse_steps() -> None:
    assert parse_steps(["4", "7-9", "12,14"]) == {4, 7, 8, 9, 12, 14}
    for bad in ("x", "9-7", "0"):
        with pytest.raises(ValueError, match="--skip-steps"):
            parse_steps([bad])


def test_the_window_rule() -> None:
    guard = BadStepGuard(sigma=6, window=8)
    for step, loss in enumerate([5.0, 5.1, 4.9], start=1):
        assert guard.verdict(step, loss, 1.0) is None
    assert guard.verdict(4, 50.0, 1.0) is None  # 3 values < half the window: not judged yet
    guard = BadStepGuard(sigma=6, window=8)
    for step, loss in enumerate([5.0, 5.1, 4.9, 5.0], start=1):
        guard.verdict(step, loss, 1.0)
    assert "loss 50" in guard.verdict(5, 50.0, 1.0)  # beyond 6 sigma of the window
    assert guard.verdict(6, 50.0, 1.0) is None  # skipped values count: a lasting shift is learnt
    assert guard.verdict(7, 4.0, 1.0) is None  # below the mean is never bad
    assert "gradient norm" in guard.verdict(8, 5.0, 1e6)
    assert "loss nan" in guard.verdict(9, math.nan, 1.0)
    assert "gradient norm inf" in guard.verdict(10, 5.0, math.inf)
    assert list(guard.losses)[-1] == 5.0  # non-finite values stay out of the window
    assert BadStepGuard(sigma=0).verdict(1, 1e9, 1e9) is None  # sigma 0: only non-finite
    assert BadStepGuard(skip_steps={3}).verdict(3, 1.0, 1.0) == "listed in --skip-steps"


def test_too_many_in_a_row_stop_with_a_way_out() -> None:
    guard = BadStepGuard(max_in_a_row=3)
    assert guard.settle(1, None) is None
    assert "step 2 skipped" in guard.settle(2, "loss nan")
    guard.settle(3, "loss nan")
    guard.stop_if_stuck(3, lambda: None)  # 2 in a row: goes on
    guard.settle(4, "loss nan")
    with pytest.raises(JobError) as err:
        guard.stop_if_stuck(4, lambda: "ck/global_step1")
    assert err.value.code == Exit.BAD_STEPS
    assert "3 steps in a row skipped (2-4" in str(err.value)
    assert "--skip-steps 2-54" in str(err.value) and "ck/global_step1" in str(err.value)
    restored = BadStepGuard()
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


# ---- for real -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_workspace(tmp_path_factory.mktemp("bad_steps"))


def _tensors(obj: object, prefix: str = ""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def saved(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's files: weights, fp32 masters, Adam moments and step."""
    return {f.name + key: t for f in sorted(checkpoint.glob("*.pt"))
            for key, t in _tensors(torch.load(f, map_location="cpu", weights_only=False))}


def changed(run_dir: Path, before: int, after: int) -> int:
    a, b = (saved(run_dir / "checkpoints" / f"global_step{s}") for s in (before, after))
    assert a.keys() == b.keys() and len(a) > 10
    return sum(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ("cpu_pipeline.json",),  # ZeRO-1: DeepSpeed itself skips the NaN (its norm check)
    ("cpu_pipeline.json", "--bf16"),  # BF16_Optimizer
    ("cpu_zero3.json",),
    ("zero0",),  # data parallel, the torch optimizer bare: the guard catches the NaN
    # 4 ranks, 4 stages: ZeRO-1 steps the torch optimizer once per parameter group, and the
    # stages hold different numbers of groups; the verdict (a collective) is asked once a step.
    ("pipeline4",),
], ids=["pipeline", "pipeline-bf16", "zero3", "data-parallel", "pipeline-4-stages"])
def test_a_nan_and_a_spike_are_skipped(ws, tmp_path: Path, layout: tuple[str, ...]) -> None:
    config, *flags = layout
    ranks = "4" if config == "pipeline4" else "2"
    base = "cpu_pipeline.json" if config == "pipeline4" else "cpu_zero3.json"
    change = {"zero0": {"zero_optimization": {"stage": 0}},
              "pipeline4": {"pipeline": {"stages": 4, "partition_method": "parameters"}}}
    if config in change:
        ds = json.loads((ROOT / "ds_configs" / base).read_text()) | change[config]
        config = str(tmp_path / f"{config}.json")
        Path(config).write_text(json.dumps(ds))
    if ranks == "4":  # a vocabulary big enough that the embedding fills stage 0 alone: 1 group
        model = json.loads(Path(ws["model"]).read_text()) | {"vocab_size": 2048}
        (tmp_path / "model.json").write_text(json.dumps(model))
        ws = {**ws, "model": str(tmp_path / "model.json")}
    guarded = tmp_path / "guarded"
    # A short window, and a limit far above the injected spike's ~2,000 sigma but far below a
    # young window's honest fluctuations.
    cmd = with_launcher(train_cmd(ws, config, guarded, *SAVE_EVERY_STEP, *flags, "--skip-window",
                                  "6", "--skip-sigma", "1000"), num_gpus=ranks,
                        master_port=str(free_port()))
    out = run(cmd, extra_env={LOSS_ENV: "4:nan,7:1000"}, timeout=300).stdout
    assert f"on {ranks} ranks" in out
    g = steps(guarded)
    assert [s for s in g if g[s]["skipped"]] == [4, 7] and g[9]["skipped_steps"] == 2
    assert math.isnan(g[4]["loss"]) and g[7]["loss"] > 100
    assert changed(guarded, 3, 4) == 0 and changed(guarded, 6, 7) == 0  # nothing moved
    assert changed(guarded, 4, 5) > 0 and changed(guarded, 7, 8) > 0  # trained steps do
    assert [g[s]["samples"] for s in (3, 4, 5)] == [48, 64, 80]  # the data was consumed
    if layout in (("cpu_pipeline.json",), ("zero0",)):
        return  # (time: the reference run below is made for the other three layouts)
    # The same steps skipped by name (no injection, no outlier rule): the same run.
    told = tmp_path / "told"
    run(with_launcher(train_cmd(ws, config, told, *SAVE_EVERY_STEP, *flags, "--skip-sigma", "0",
                                "--skip-steps", "4", "7"), num_gpus=ranks,
                          master_port=str(free_port())), timeout=300)
    t = steps(told)
    assert [s for s in t if t[s]["skipped"]] == [4, 7]
    assert all(t[s]["loss"] == g[s]["loss"] for s in (1, 2, 3, 5, 6, 8, 9))
    assert all(t[s]["lr"] == g[s]["lr"] for s in t)  # the LR schedule follows the step


@pytest.mark.distributed
@pytest.mark.slow
def test_bad_steps_in_a_row_stop_the_job_and_skip_steps_gets_past(ws, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "6", "--save-interval", "2",
                    "--max-skips-in-a-row", "2")
    with pytest.raises(AssertionError) as err:
        run(cmd, extra_env={LOSS_ENV: "3:nan,4:nan"})
    text = str(err.value)
    assert text.startswith(f"exit {int(Exit.BAD_STEPS)}")
    assert "2 steps in a row skipped (3-4" in text and "global_step2" in text
    assert not (out / "checkpoints" / "global_step4").exists()
    res = run(cmd + ["--skip-steps", "3-4"], extra_env={LOSS_ENV: "3:nan,4:nan"})
    assert "resumed from" in res.stdout and "global_step2: step 2" in res.stdout
    s = steps(out)
    assert [k for k in s if s[k]["skipped"]] == [3, 4] and sorted(s) == list(range(1, 7))
