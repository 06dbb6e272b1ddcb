"""Resume across the JSON swap: a checkpoint written under pipeline (2 stages) resumes under ZeRO-3
(2 ranks) and back, with weights, Adam moments, step, LR schedule and data position carried: the
resumed run's losses equal those of the run that never changed layout (CPU, fp32, 2 ranks, through
the deepspeed launcher). Also ZeRO-3 -> plain data parallel without ZeRO, where the torch optimizer
holds the moments itself."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from argonne_ds.checkpoint import reshard
from tests.train_helpers import ROOT, run, steps, train_cmd

N, SAVE = 8, 4
# The same global batch in both layouts (8 samples): pipeline 2 stages = 1 data-parallel rank x
# micro 4 x accumulation 2; ZeRO-3 = 2 data-parallel ranks x micro 4 x accumulation 1.
ACCUM = {"cpu_pipeline.json": "2", "cpu_zero3.json": "1", "dp_stage0.json": "1"}


def config_path(name: str, folder: Path) -> str:
    """ds_configs/NAME, or dp_stage0.json: plain data parallel without ZeRO (written here)."""
    if name != "dp_stage0.json":
        return name
    config = json.loads((ROOT / "ds_configs" / "cpu_zero3.json").read_text())
    config["zero_optimization"] = {"stage": 0}
    (folder / name).write_text(json.dumps(config))
    return str(folder / name)


def args(ds_config: str, max_steps: int = N, save: int = SAVE, precision: str = "--fp32"
         ) -> tuple[str, ...]:
    return ("--max-steps", str(max_steps), "--save-interval", str(save), "--shuffle-window", "8",
            "--gradient-accumulation-steps", ACCUM[ds_config], precision)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("src", "dst", "precision"), [
    ("cpu_pipeline.json", "cpu_zero3.json", "--fp32"),
    ("cpu_zero3.json", "cpu_pipeline.json", "--fp32"),
    ("cpu_zero3.json", "dp_stage0.json", "--fp32"),
    # bf16 with fp32 gradient accumulation: the pipeline runs DeepSpeed's BF16_Optimizer
    ("cpu_pipeline.json", "cpu_zero3.json", "--bf16"),
])
def test_resume_across_layouts_is_exact(ws, tmp_path: Path, src: str, dst: str,
                                        precision: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    src_json, dst_json = config_path(src, tmp_path), config_path(dst, tmp_path)
    run(train_cmd(ws, src_json, a, *args(src, precision=precision)))  # never changes layout
    shutil.copytree(a / "checkpoints" / f"global_step{SAVE}",
                    b / "checkpoints" / f"global_step{SAVE}")
    out = run(train_cmd(ws, dst_json, b, *args(dst, precision=precision))).stdout
    assert f"global_step{SAVE} across layouts: step {SAVE}" in out, out
    assert f"Adam moments (step {SAVE})" in out
    assert (b / "checkpoints" / f"global_step{SAVE}" / reshard.UNIVERSAL / reshard.DONE).is_file()
    sa, sb = steps(a), steps(b)
    assert sorted(sb) == list(range(SAVE + 1, N + 1))
    for step in range(SAVE + 1, N + 1):
        assert sa[step]["lr"] == sb[step]["lr"] and sa[step]["samples"] == sb[step]["samples"]
        # Step SAVE+1 checks weights and data; the later ones the moments too (restarting Adam
        # moves these losses by ~4e-2; measured equal to the bit on this CPU).
        assert math.isclose(sa[step]["loss"], sb[step]["loss"], rel_tol=1e-6), (
            step, sa[step]["loss"], sb[step]["loss"])
    assert sa[N]["loss"] < sa[1]["loss"]
    if (src, dst, precision) == ("cpu_pipeline.json", "cpu_zero3.json", "--fp32"):
        # The resumed run's own checkpoint is native to its layout: a plain resume continues
        # it (once: the same for every pair).
        run(train_cmd(ws, dst_json, b, *args(dst, max_steps=N + 2, save=2, precision=precision)))
        assert sorted(steps(b)) == list(range(SAVE + 1, N + 3))


def test_zero_stage_0_checkpoint_is_refused_with_a_reason(tmp_path: Path) -> None:
    ckpt = tmp_path / "global_step4"
    ckpt.mkdir()
    torch.save({"module": {}, "global_steps": 4}, ckpt / "mp_rank_00_model_states.pt")
    source = reshard.read_source(ckpt, {"mode": "pipeline", "world_size": 2})
    assert source.client["global_steps"] == 4 and "module" not in source.client
    with pytest.raises(reshard.ReshardError, match="ZeRO stage 0.*config it was written with"):
        reshard.to_universal(source)
    # Through convert_once: rank 0 records the reason, another rank reads the same one.
    error = reshard.convert_once(source, rank0=True)
    assert error and "ZeRO stage 0" in error
    assert reshard.convert_once(source, rank0=False, timeout_s=5) == error
    assert not (ckpt / reshard.UNIVERSAL).exists()


def test_adam_step_keeps_each_optimizers_form() -> None:
    from argonne_ds.engine.state import adam_step_value

    p = torch.nn.Parameter(torch.ones(3))
    adamw = torch.optim.AdamW([p], lr=0.1)
    fresh = adam_step_value(adamw, None, 4)  # torch creates its state lazily
    assert torch.is_tensor(fresh) and fresh.dtype == torch.float32 and float(fresh) == 4
    adamw.state[p].update(step=fresh, exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))
    p.grad = torch.ones(3)
    adamw.step()  # torch accepts the state as created, and counts on from it
    assert float(adamw.state[p]["step"]) == 5
    assert adam_step_value(adamw, torch.tensor(1.0, dtype=torch.float64), 7).dtype == torch.float64

    class KernelAdam(torch.optim.Optimizer):  # like DeepSpeed's FusedAdam / CPU Adam: int steps
        pass

    kernel = KernelAdam([torch.nn.Parameter(torch.ones(1))], {})
    assert adam_step_value(kernel, None, 4) == 4 and isinstance(adam_step_value(kernel, 1, 4), int)


def _pipeline_json(folder: Path, partition: str) -> str:
    config = json.loads((ROOT / "ds_configs" / "cpu_pipeline.json").read_text())
    config["pipeline"]["partition_method"] = partition
    path = folder / f"pipeline_{partition}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_new_stage_partition_is_converted(
        ws, tmp_path: Path) -> None:
    """The ZeRO-1 optimizer files are per stage: a checkpoint whose stages held other layers
    (here "uniform": layers 0-3 | 4-6, against "compute": 0-2 | 3-6) is converted, not loaded,
    and the run continues as the one that never changed."""
    uniform, compute = _pipeline_json(tmp_path, "uniform"), _pipeline_json(tmp_path, "compute")
    a, b = tmp_path / "a", tmp_path / "b"
    flags = args("cpu_pipeline.json")
    run(train_cmd(ws, uniform, a, *flags))
    tag = f"global_step{SAVE}"
    marker = json.loads((a / "checkpoints" / tag / "argonne_complete.json").read_text())
    assert marker["pipeline_parts"] == [0, 4, 7]
    shutil.copytree(a / "checkpoints" / tag, b / "checkpoints" / tag)
    out = run(train_cmd(ws, compute, b, *flags)).stdout
    assert "pipeline_parts [0, 4, 7]" in out and "converting it" in out, out
    assert f"{tag} across layouts: step {SAVE}" in out
    sa, sb = steps(a), steps(b)
    for step in range(SAVE + 1, N + 1):
        assert math.isclose(sa[step]["loss"], sb[step]["loss"], rel_tol=1e-6), step


def test_an_old_marker_counts_as_the_parameters_partition() -> None:
    """Markers written before the stage bounds were recorded: DeepSpeed's "parameters" split,
    computed from the config (here 0-2 | 3-6, as "compute" would split it)."""
    from argonne_ds.checkpoint.checkpointer import with_stage_bounds
    from argonne_ds.config import ArgonneConfig
    from tests.train_helpers import MODEL

    config = ArgonneConfig(**MODEL)
    old = {"mode": "pipeline", "pipeline_stages": 2, "world_size": 2}
    assert with_stage_bounds(old, config)["pipeline_parts"] == [0, 3, 7]
    assert "pipeline_parts" not in old  # the marker read is not changed in place
    for info in ({"mode": "zero3", "world_size": 2},
                 {"mode": "pipeline", "pipeline_stages": 2, "pipeline_parts": [0, 4, 7]}):
        assert with_stage_bounds(info, config) == info
