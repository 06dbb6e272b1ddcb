"""prepare's gigatoken process (encode_worker.py): recycled children continue a shard exactly,
errors come back as the same DataError, a dead server is replaced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from argonne_ds.data import DataError, encode_worker
from argonne_ds.data.discovery import discover_shards
from argonne_ds.data.shards import iter_text_batches
from argonne_ds.data.tokenizer import GigatokenEncoder, HFEncoder, load_tokenizer
from tests.data_helpers import qwen_tokenizer_dir, write_corpus


@pytest.fixture
def fresh_servers() -> Iterator[None]:
    encode_worker.close_servers()  # servers read their settings when they start
    yield
    encode_worker.close_servers()


def hf_tokens(shard, tok) -> np.ndarray:
    hf = HFEncoder(tok)
    parts = [hf.encode(b.texts)[0] for b in iter_text_batches(shard, "text") if len(b.texts)]
    return np.concatenate(parts) if parts else np.empty(0, np.uint32)


@pytest.mark.parametrize("workers", [1, 3])
def test_ranges_and_recycled_workers_give_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_servers: None, workers: int,
) -> None:
    monkeypatch.setenv("ARGONNE_ENCODE_WORKERS", str(workers))
    monkeypatch.setenv("ARGONNE_ENCODE_MIN_PART_MB", "0")  # cut even these tiny shards
    monkeypatch.setenv("ARGONNE_ENCODE_WORKER_MTOK", "1e-6")  # one batch and a worker is spent
    write_corpus(tmp_path / "shards")  # null/blank rows, row groups of 7
    tok = load_tokenizer(qwen_tokenizer_dir())
    enc = GigatokenEncoder(tok)
    for shard in discover_shards(str(tmp_path / "shards" / "*.parquet")):
        out = tmp_path / f"{shard.name}.bin"
        out.write_bytes(b"stale bytes are overwritten")
        n_tokens, n_docs, n_skipped = encode_worker.tokenize_shard(enc, shard, "text", str(out),
                                                                   batch_rows=5)
        want = hf_tokens(shard, tok)
        got = np.fromfile(out, dtype=np.uint32)
        assert np.array_equal(got, want) and n_tokens == len(want)
        assert n_docs == (want == tok.separator_id).sum() and n_skipped == 3
    assert not list(tmp_path.glob("*.part*"))
    server = encode_worker.get_server(enc.json_path)
    assert server.worker_requests >= 52 // 5  # a worker per batch: each stopped after one


def corrupt(path: Path, groups: tuple[int, ...]) -> None:
    """5000 rows in row groups of 1000, the pages of `groups` damaged."""
    pq.write_table(pa.table({"text": [f"row {i}." for i in range(5000)]}), path,
                   row_group_size=1000)
    data = bytearray(path.read_bytes())
    for g in groups:
        col = pq.ParquetFile(path).metadata.row_group(g).column(0)
        lo = (col.dictionary_page_offset or col.data_page_offset) + col.total_compressed_size // 4
        data[lo:lo + col.total_compressed_size // 2] = b"\xab" * (col.total_compressed_size // 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("groups", [(3,), (1, 3), (0,)])
@pytest.mark.parametrize("workers", [1, 3])
def test_a_bad_shard_is_the_same_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_servers: None,
    groups: tuple[int, ...], workers: int,
) -> None:
    monkeypatch.setenv("ARGONNE_ENCODE_WORKERS", str(workers))
    monkeypatch.setenv("ARGONNE_ENCODE_MIN_PART_MB", "0")
    corrupt(tmp_path / "bad.parquet", groups)
    (shard,) = discover_shards(str(tmp_path / "bad.parquet"))
    tok = load_tokenizer(qwen_tokenizer_dir())
    with pytest.raises(DataError) as in_process:  # reading in order: the first damaged group
        for b in iter_text_batches(shard, "text", batch_rows=500):
            HFEncoder(tok).encode(b.texts)
    out = tmp_path / "out.bin"
    with pytest.raises(DataError) as worker:
        encode_worker.tokenize_shard(GigatokenEncoder(tok), shard, "text", str(out),
                                     batch_rows=500)
    assert str(worker.value) == str(in_process.value)
    assert f"bad.parquet: unreadable at row {groups[0] * 1000} (" in str(worker.value)
    assert not list(tmp_path.glob("out.bin.part*"))


def test_a_dead_server_is_replaced(tmp_path: Path, fresh_servers: None) -> None:
    write_corpus(tmp_path / "shards")
    shard = discover_shards(str(tmp_path / "shards" / "*.parquet"))[0]
    tok = load_tokenizer(qwen_tokenizer_dir())
    enc = GigatokenEncoder(tok)
    first = encode_worker.tokenize_shard(enc, shard, "text", str(tmp_path / "a.bin"))
    server = encode_worker.get_server(enc.json_path)
    server.proc.kill()
    server.proc.wait()
    assert encode_worker.tokenize_shard(enc, shard, "text", str(tmp_path / "b.bin")) == first
    assert encode_worker.get_server(enc.json_path) is not server
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
