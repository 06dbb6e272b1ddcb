"""`argonne-ds model-info`: parameter counts and the per-GPU training memory plan."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from argonne_ds.cli import main
from argonne_ds.config import load_model_config
from argonne_ds.model.info import GIB, balanced_partition, pipeline_layer_params


def _brute_force_min_max(weights: list[int], parts: int) -> int:
    best = sum(weights)
    n = len(weights)
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_balanced_partition_is_optimal(parts: int) -> None:
    weights = [50, 7, 7, 7, 7, 7, 7, 1, 50]
    sums = balanced_partition(weights, parts)
    assert sum(sums) == sum(weights) and len(sums) <= parts
    assert max(sums) == _brute_force_min_max(weights, parts)


def test_pipeline_layers_cover_the_model() -> None:
    config = load_model_config("argonne2-orig")
    assert sum(pipeline_layer_params(config)) == 5_558_579_200


def test_model_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", "--preset", "argonne2-orig", "--gpus", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == 5_558_579_200
    assert info["parameters"]["embedding"] == 2 * 151_665 * 4096
    assert info["config"]["head_dim"] == 170
    plans = {m["mode"]: m for m in info["memory"]}
    zero3 = plans["zero3"]
    assert zero3["params_per_gpu"] == 5_558_579_200 // 8
    assert zero3["gpu_gib"] == pytest.approx(5_558_579_200 / 8 * 16 / GIB)
    offload = plans["zero3_offload"]
    assert offload["gpu_gib"] == pytest.approx(zero3["gpu_gib"] / 4)
    assert offload["host_gib"] == pytest.approx(zero3["gpu_gib"] * 3 / 4)
    # A pipeline stage cannot be smaller than its largest layer (the 621M-parameter embedding).
    assert 5_558_579_200 // 8 <= plans["pipeline"]["params_per_gpu"] < 5_558_579_200 // 4


def test_model_info_from_config_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128,
                                "num_key_value_heads": 2, "head_dim": None, "vocab_size": 1000}))
    assert main(["model-info", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "num_hidden_layers         2" in out and "training memory per GPU" in out


def test_model_info_bad_config_is_one_clear_line(tmp_path, capsys) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"hidden_size": 100, "num_attention_heads": 6, "num_key_value_heads": 2, '
                    '"head_dim": null}')
    assert main(["model-info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "set head_dim" in err and "Traceback" not in err


def test_cli_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "argonne_ds.cli", "model-info", "--preset", "tiny"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "model tiny" in out and "zero3_offload" in out
