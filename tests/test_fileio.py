"""One atomic JSON write for every file other processes read (the cache's index and entries, the
out-of-memory record), under temporary names that carry the host as well as the pid."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from argonne_ds import fileio
from argonne_ds.reliability import read_backoff, write_backoff


def test_temp_names_carry_host_and_pid(tmp_path: Path) -> None:
    tmp = fileio.temp_path(tmp_path / "index.json")
    assert tmp.parent == tmp_path and tmp.name.startswith("index.json.tmp-")
    assert socket.gethostname() in tmp.name and str(os.getpid()) in tmp.name


def test_write_json_atomic_leaves_only_the_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    renamed: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        renamed.append((Path(src).name, Path(dst).name))
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    fileio.write_json_atomic(tmp_path / "a.json", {"x": 1}, sync=True)
    write_backoff(tmp_path, 2, 4, 7, 0, "CUDA out of memory")  # the relaunch record: same door
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert read_backoff(tmp_path)["micro_batch_size"] == 2
    assert [dst for _, dst in renamed] == ["a.json", "oom_backoff.json"]
    assert all(socket.gethostname() in src for src, _ in renamed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "oom_backoff.json"]


def test_a_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        fileio.write_json_atomic(tmp_path / "a.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []
