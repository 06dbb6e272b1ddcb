"""The run config: one declaration per option, flags generated from it, a YAML/JSON file, the
precedence defaults < file < flags, validation in one place, the shipped examples, and the
comparison on resume (refused, warned, noted) — the last for real on 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from argonne_ds.checkpoint import store as ckpt
from argonne_ds.cli import build_parser
from argonne_ds.engine.ds_config import resolve_ds_config
from argonne_ds.run_config import (
    SECTIONS,
    ConfigError,
    DataConfig,
    RunConfig,
    TrainConfig,
    compare,
    options_of,
)
from argonne_ds.run_options import from_dict, resolve_run_config
from tests.train_helpers import ROOT, run, steps, train_cmd

EXAMPLES = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


def resolve(*argv: str) -> RunConfig:
    return resolve_run_config(build_parser().parse_args(["train", *argv]))


def test_every_option_is_one_flag_and_one_key(capsys: pytest.CaptureFixture) -> None:
    """Each option is declared once: its flag comes from the declaration, and no two sections
    share a name (so flat keys in a file are unambiguous)."""
    sections = RunConfig().to_dict()
    names = [n for section in sections.values() for n in section]
    assert len(names) == len(set(names)) == len(RunConfig().flat())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    file_only = {f.name for cls in SECTIONS.values() for f in options_of(cls)
                 if f.metadata["file_only"]}
    assert file_only == {"sources", "phases"}  # lists of mappings: keys of a file only
    for name in names:
        flag = "--deepspeed_config" if name == "deepspeed_config" else "--" + name.replace(
            "_", "-")
        assert (flag in text) != (name in file_only), name


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_a_file(tmp_path: Path, suffix: str) -> None:
    run = RunConfig(DataConfig(["a/*.parquet", "b/*.parquet"], cache_dir="c", block_size=64,
                               shuffle_window=8, allow_shard_change=True),
                    TrainConfig(deepspeed_config="ds.json", model="argonne2-1b", batch_size=2,
                                learning_rate=1e-3, min_learning_rate=1e-5, max_tokens=10**9,
                                precision="bf16", seed=7))
    run.checkpoint.save_interval, run.log.eval_data_glob = 250, ["held/*.parquet"]
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        run.write(path)
    else:
        path.write_text(json.dumps(run.to_dict()))
    again = resolve("--config", str(path))
    assert again == run and again.data.seed == 7  # one --seed: weights and data shuffle
    assert not compare(run.to_dict(), again)


def test_precedence_defaults_then_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  data_glob: shards/*.parquet\n  block_size: 64\n  allow_shard_change: true\n"
        "train:\n  deepspeed_config: ds.json\n  learning_rate: 3e-4\n  max_steps: 100\n"
        "  precision: fp32\n"
        # flat keys, flag spelling, are accepted too
        "save-interval: 7\nlog_interval: 3\n")
    run = resolve("--config", str(path), "--block-size", "4096", "--bf16",
                  "--no-allow-shard-change", "--max-tokens", "1e9")
    assert run.data.block_size == 4096  # a flag wins even when it says the default
    assert run.train.precision == "bf16" and not run.data.allow_shard_change
    assert run.train.learning_rate == 3e-4 and isinstance(run.train.learning_rate, float)
    assert run.train.max_steps == 100 and run.train.max_tokens == 10**9
    assert run.checkpoint.save_interval == 7 and run.log.log_interval == 3
    assert run.data.data_glob == ["shards/*.parquet"]
    assert run.train.warmup_steps == 2000 and run.checkpoint.output_dir == "runs/argonne"
    plain = resolve("--data-glob", "x", "--deepspeed_config", "d.json", "--max-steps", "5")
    assert plain == RunConfig(DataConfig(["x"]), TrainConfig(deepspeed_config="d.json",
                                                             max_steps=5))


@pytest.mark.parametrize(("text", "message"), [
    ("train:\n  learnig_rate: 1e-3\n", "unknown option train.learnig_rate; did you mean "
                                        "'learning_rate'"),
    ("blok_size: 64\n", "unknown option blok_size; did you mean 'block_size'"),
    ("data:\n  block_size: many\n", "block_size must be int, got 'many'"),
    ("data:\n  on_bad_shard: ignore\n", "data.on_bad_shard must be one of error|skip"),
    ("- a\n- b\n", "expected a mapping"),
    ("train: [\n", "does not parse"),
])
def test_bad_files_are_one_clear_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        resolve("--config", str(path), "--data-glob", "x", "--deepspeed_config", "d",
                "--max-steps", "1")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("--config", str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--deepspeed_config", "d", "--max-steps", "1"], "give --data-glob"),
    (["--data-glob", "x", "--max-steps", "1"], "give --deepspeed_config"),
    (["--data-glob", "x", "--deepspeed_config", "d"], "give --max-steps or --max-tokens"),
    (["--data-glob", "x", "--deepspeed_config", "d", "--max-steps", "1", "--eval-interval", "5"],
     "--eval-interval needs --eval-data-glob"),
    (["--data-glob", "x", "--deepspeed_config", "d", "--max-steps", "0"], "max_steps must be"),
    (["--data-glob", "x", "--deepspeed_config", "d", "--max-steps", "1", "--learning-rate",
      "1e-5"], "min_learning_rate"),
])
def test_validated_in_one_place(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(*argv)


def test_compare_sorts_changes_by_what_they_mean() -> None:
    before = RunConfig(DataConfig(["x"]), TrainConfig(deepspeed_config="a.json", max_steps=10))
    after = from_dict(before.to_dict())
    after.data.block_size, after.train.learning_rate = 2048, 1e-3
    after.log.log_interval, after.train.deepspeed_config = 1, "b.json"
    kinds = {c.name: c.kind for c in compare(before.to_dict(), after)}
    assert kinds == {"data.block_size": "refuse", "train.learning_rate": "warn",
                     "log.log_interval": "note", "train.deepspeed_config": "note"}
    # A checkpoint of the previous format (flat train options, nested data) still compares;
    # options it lacks are not counted as changes.
    old = {"deepspeed_config": "a.json", "learning_rate": 1e-3, "data": {"block_size": 4096}}
    assert [c.name for c in compare(old, after)] == ["data.block_size", "train.deepspeed_config"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_run_configs_resolve(path: Path) -> None:
    run = resolve("--config", str(path))
    assert (ROOT / run.train.deepspeed_config).is_file()
    ds, max_steps, _ = resolve_ds_config(
        from_dict({**run.to_dict(), "train": {**run.to_dict()["train"], "deepspeed_config": str(
            ROOT / run.train.deepspeed_config)}}), world_size=8 if "argonne2" in path.name else 2)
    assert max_steps >= 1 and ds["scheduler"]["type"] == "WarmupCosineLR"


def test_examples_shipped() -> None:
    assert {p.name for p in EXAMPLES} >= {"argonne2_pipeline.yaml", "argonne2_zero3.yaml",
                                          "quickstart.yaml"}


def test_run_directory_is_a_checkpoint_argument(tmp_path: Path) -> None:
    """export/generate/eval/--checkpoint-path take train's --output-dir as well."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "global_step4").mkdir(parents=True)
    ckpt.write_marker(run_dir / "checkpoints", "global_step4", {"step": 4})
    assert ckpt.split_checkpoint_path(run_dir) == (run_dir / "checkpoints", None)
    directory, tag, info = ckpt.resolve_checkpoint(run_dir)
    assert (directory, tag, info["step"]) == (run_dir / "checkpoints", "global_step4", 4)
    with pytest.raises(ckpt.CheckpointError, match="no complete argonne-ds checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_compares_the_run_config(ws, tmp_path: Path) -> None:
    """A change that moves the data is refused before anything is loaded or written; one that
    changes the training from here on is announced; the written run config resumes the run."""
    out = tmp_path / "run"
    run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "4", "--save-interval", "4"))
    written = (out / "run_config.yaml").read_text()
    assert yaml.safe_load(written)["data"]["block_size"] == 32

    with pytest.raises(AssertionError) as err:
        run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "6", "--block-size", "16"))
    assert "data.block_size 32 -> 16" in str(err.value) and "new run" in str(err.value)
    assert (out / "run_config.yaml").read_text() == written  # nothing already written is lost
    assert max(steps(out)) == 4
    with pytest.raises(AssertionError) as err:  # 2 ranks of ZeRO-3: accumulation 4 -> 32
        run(train_cmd(ws, "cpu_zero3.json", out, "--max-steps", "6", "--global-batch-size", "32"))
    assert "global batch of 16 samples, this job makes 32" in str(err.value)
    assert "--global-batch-size 16" in str(err.value)

    cmd = train_cmd(ws, "cpu_zero3.json", out)
    base = cmd[:cmd.index("train") + 1]  # the launcher, then only the file and two flags
    res = run([*base, "--config", str(out / "run_config.yaml"), "--max-steps", "6",
               "--learning-rate", "1e-3"])
    text = res.stdout + res.stderr
    assert "resumed from" in text and "train.learning_rate 0.003 -> 0.001" in text
    assert "train.max_steps 4 -> 6" in text
    assert sorted(steps(out)) == list(range(1, 7))
    assert yaml.safe_load((out / "run_config.yaml").read_text())["train"]["learning_rate"] == 1e-3


def test_notes_name_where_each_value_came_from(tmp_path: Path) -> None:
    """A note about an override says whether the value came from the run config file or a flag."""
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  data_glob: [x]\ntrain:\n  batch_size: 2\n  max_steps: 10\n  "
                    f"deepspeed_config: {ROOT / 'ds_configs' / 'cpu_zero3.json'}\n")
    _, _, notes = resolve_ds_config(resolve("--config", str(path)), world_size=2)
    assert any(f"batch_size 2 (train.batch_size in {path}) overrides" in n for n in notes), notes
    _, _, notes = resolve_ds_config(resolve("--config", str(path), "--batch-size", "1",
                                            "--learning-rate", "1e-3"), world_size=2)
    assert any("batch_size 1 (--batch-size) overrides" in n for n in notes), notes
    assert any("learning_rate 0.001 (--learning-rate) overrides optimizer.params.lr" in n
               for n in notes), notes
