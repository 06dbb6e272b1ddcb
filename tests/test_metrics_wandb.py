"""wandb's mode: WANDB_MODE when set, online when credentials are there (WANDB_API_KEY or a netrc
entry for the wandb server), else offline with one line saying how to go online and sync.

No test here contacts the network: wandb.init runs only where the mode is offline."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from argonne_ds.metrics import STEP_METRIC, MetricsSink, wandb_mode

WANDB_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL",
             "WANDB_DIR", "WANDB_CONFIG_DIR", "NETRC")


def _netrc(path: Path, machine: str) -> Path:
    path.write_text(f"machine {machine}\n  login user\n  password {'k' * 40}\n")
    path.chmod(0o600)
    return path


def _run_config(wandb_file: Path) -> dict[str, Any]:
    """The config an offline run saved, read from its .wandb file: wandb >= 0.2x writes
    files/config.yaml only when it uploads (online or `wandb sync`). The file is a LevelDB log
    (32 KiB blocks of chunks with 7-byte headers) after wandb's 7-byte header; each record is a
    wandb Record protobuf."""
    config: dict[str, Any] = {}
    for record in _records(wandb_file):
        kind_name = record.WhichOneof("record_type")
        items = (record.run.config.update if kind_name == "run" else
                 record.config.update if kind_name == "config" else [])
        config.update({i.key: json.loads(i.value_json) for i in items})
    return config


def _records(wandb_file: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = wandb_file.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes are padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            yield pb.Record.FromString(pending)
            pending = b""


def _history(wandb_file: Path) -> list[dict[str, Any]]:
    rows = []
    for record in _records(wandb_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item})
    return rows


@pytest.mark.parametrize("mode", ["disabled", "offline", "online"])
def test_wandb_mode_set_is_respected(tmp_path: Path, mode: str) -> None:
    # Even against credentials: the user's explicit choice wins.
    env = {"WANDB_MODE": mode, "WANDB_API_KEY": "k" * 40, "HOME": str(tmp_path)}
    assert wandb_mode(env)[0] == mode


def test_api_key_means_online(tmp_path: Path) -> None:
    mode, why = wandb_mode({"WANDB_API_KEY": "k" * 40, "HOME": str(tmp_path)})
    assert mode == "online" and "WANDB_API_KEY" in why


@pytest.mark.parametrize("machine", ["api.wandb.ai", "api.forge.coreweave.com"])
def test_netrc_entry_from_wandb_login_means_online(tmp_path: Path, machine: str) -> None:
    _netrc(tmp_path / ".netrc", machine)
    assert wandb_mode({"HOME": str(tmp_path)})[0] == "online"  # ~/.netrc
    elsewhere = _netrc(tmp_path / "elsewhere", machine)
    assert wandb_mode({"HOME": str(tmp_path / "none"), "NETRC": str(elsewhere)})[0] == "online"
    assert wandb_mode({}, netrc_path=elsewhere)[0] == "online"


def test_netrc_entry_must_match_the_server(tmp_path: Path) -> None:
    _netrc(tmp_path / ".netrc", "wandb.example.org")
    env = {"HOME": str(tmp_path)}
    assert wandb_mode(env)[0] == "offline"  # a key for another host is not wandb's
    assert wandb_mode({**env, "WANDB_BASE_URL": "https://wandb.example.org"})[0] == "online"
    # `wandb login --host` keeps the server in the global settings file instead.
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "settings").write_text("[default]\nbase_url = https://wandb.example.org\n")
    assert wandb_mode({**env, "WANDB_CONFIG_DIR": str(tmp_path / "cfg")})[0] == "online"


def test_no_credentials_means_offline(tmp_path: Path) -> None:
    mode, why = wandb_mode({"HOME": str(tmp_path)})
    assert mode == "offline" and str(tmp_path / ".netrc") in why
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user\n")  # no password
    assert wandb_mode({"HOME": str(tmp_path)})[0] == "offline"


def test_offline_run_keeps_config_and_says_how_to_sync(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb
    assert wandb_mode(os.environ)[0] == "offline"  # never online here
    caplog.set_level(logging.INFO, logger="argonne_ds.metrics")
    sink = MetricsSink(tmp_path, "run0001", {"lr": 0.125, "model": {"hidden_size": 16}})
    assert sink.wandb is not None
    sink.log({"step": 1, "loss": 2.5})
    sink.close()
    # wandb 0.31's finish() can return before its service has written the run file (seen ~1 in
    # 10); teardown waits for the service, as the process exit does.
    import wandb

    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*-run0001"))
    assert len(runs) == 1
    saved = _run_config(runs[0] / "run-run0001.wandb")
    assert saved["lr"] == 0.125 and saved["model"] == {"hidden_size": 16}
    lines = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(lines) == 1 and f"wandb sync {runs[0]}" in lines[0]
    assert "wandb login" in lines[0] and "WANDB_API_KEY" in lines[0]
    assert "WANDB_MODE" not in os.environ  # decided per run, not set for the whole process


def test_a_replayed_step_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job resumed from an earlier checkpoint logs steps again: they go to wandb with the
    training step as a metric (charts use it as their x-axis), not as wandb's own step, which
    must only grow (wandb drops a point logged at a step below its last)."""
    import wandb

    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    sink = MetricsSink(tmp_path, "run0002", {})
    for step in (1, 2, 3, 4, 3, 4, 5):  # a rollback to step 2's checkpoint, in one run here
        sink.log({"step": step, "loss": 10.0 - step})
    sink.close()
    wandb.teardown()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-run0002")
    rows = [r for r in _history(run_dir / "run-run0002.wandb") if "loss" in r]
    assert [r[STEP_METRIC] for r in rows] == [1, 2, 3, 4, 3, 4, 5]  # none dropped
    assert [r["_step"] for r in rows] == sorted(r["_step"] for r in rows)
