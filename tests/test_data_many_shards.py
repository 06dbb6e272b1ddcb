"""Thousands of shards: open files stay bounded, a complete cache is read without the build lock,
and a changed shard is never served from a stale index."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from argonne_ds.data import DataError
from argonne_ds.data.cache import TokenStore, build_lock, prepare_cache
from argonne_ds.data.discovery import discover_shards
from argonne_ds.data.loader import DataConfig, build_data_iterator
from argonne_ds.data.tokenizer import load_tokenizer, train_fallback_tokenizer
from tests.data_helpers import random_doc

ROOT = Path(__file__).resolve().parents[1]
N_SHARDS = 3_100  # three times the 1,024 descriptors the reader may hold
T = 16


def write_shards(folder: Path, n: int, seed: int = 0) -> None:
    """n tiny shards of two short documents each (~25 tokens: more than a block of T)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        texts = [random_doc(rng, 4, 10) for _ in range(2)]
        pq.write_table(pa.table({"text": texts}), folder / f"s_{k}.parquet")


def config(root: Path, tok: str, shuffle_window: int = 0) -> DataConfig:
    return DataConfig([str(root / "shards" / "*.parquet")], tokenizer_path=tok,
                      cache_dir=str(root / "cache"), block_size=T, shuffle_window=shuffle_window,
                      encoder="tokenizers")


def stream_of(index) -> np.ndarray:
    """The reference: the index's token files concatenated (read whole, one at a time)."""
    return np.concatenate([np.fromfile(p, np.uint32) for p in index.token_paths()])


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3,100 shards, a small BPE trained on the first of them, the cache prepared once."""
    root = tmp_path_factory.mktemp("many")
    write_shards(root / "shards", N_SHARDS)
    shards = discover_shards(str(root / "shards" / "*.parquet"))
    tok = str(train_fallback_tokenizer(shards[:50], "text", root / "tok", vocab_size=300))
    index = prepare_cache(shards, load_tokenizer(tok), root / "cache", encoder="tokenizers",
                          show_progress=False)
    assert index.stats["tokenized_now"] == N_SHARDS
    return {"root": root, "tok": tok, "index": index}


READ_EPOCHS = r"""
import json, os, resource, sys, zlib
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
from argonne_ds.data.cache import TokenStore
from argonne_ds.data.loader import DataConfig, build_data_iterator
out = {}
for window, mapped in ((0, False), (int(sys.argv[3]), False), (int(sys.argv[3]), True)):
    cfg = DataConfig([sys.argv[1] + "/shards/*.parquet"], tokenizer_path=sys.argv[2],
                     cache_dir=sys.argv[1] + "/cache", block_size=16, shuffle_window=window,
                     encoder="tokenizers")
    it, _ = build_data_iterator(cfg, global_batch_size=1, micro_batch_size=1,
                                show_progress=False)
    if mapped:  # memory-map every file, however small (the path of large shards)
        it.source.store = TokenStore(*it.cache_index.token_files(), read_whole_bytes=0)
    crc, most = 0, 0
    for _ in range(it.blocks_per_epoch):
        x, y = next(it)
        crc = zlib.crc32(x[0].numpy().astype("uint32").tobytes(), crc)
        most = max(most, len(os.listdir("/proc/self/fd")))
    out[f"{window}{'-mapped' if mapped else ''}"] = {
        "crc": crc, "blocks": it.blocks_per_epoch, "max_fds": most}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_an_epoch_over_3100_shards_under_ulimit_1024(many: dict) -> None:
    index, root = many["index"], many["root"]
    ref = stream_of(index)
    n = (len(ref) - 1) // T
    assert n * T > len(ref) - index.entries[-1].n_tokens  # the epoch reaches the last shard
    proc = subprocess.run([sys.executable, "-c", READ_EPOCHS, str(root), many["tok"], str(n)],
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    print(got)
    # In order: the blocks are the token files' concatenation, block after block.
    plain = got["0"]
    assert plain["blocks"] == n and plain["crc"] == zlib.crc32(ref[:n * T].tobytes())
    # One window over the whole epoch: every block from anywhere (the worst case for the open
    # files), in the order the shuffle defines.
    from argonne_ds.data.stream import window_order

    order = window_order(1234, 0, 0, n, True)
    shuffled = ref[(order[:, None] * T + np.arange(T)).ravel()]
    assert got[str(n)]["crc"] == got[f"{n}-mapped"]["crc"] == zlib.crc32(shuffled.tobytes())
    for run in got.values():
        assert run["max_fds"] < 200, got
    # Memory-mapped: the 64 most recently read files stay open (beside the process's own few).
    assert got[f"{n}-mapped"]["max_fds"] >= 64, got


@pytest.mark.parametrize("read_whole_bytes", [0, 256 * 2**10])  # all mapped; all read whole
def test_the_token_store_keeps_few_files_open(tmp_path: Path, read_whole_bytes: int) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 2**32, rng.integers(0, 40), dtype=np.uint32) for _ in range(300)]
    paths = []
    for k, part in enumerate(parts):
        paths.append(tmp_path / f"{k}.bin")
        part.tofile(paths[-1])
    whole = np.concatenate(parts)
    before = len(os.listdir("/proc/self/fd"))
    store = TokenStore(paths, max_open=8, read_whole_bytes=read_whole_bytes)
    most = 0
    for _ in range(2_000):
        a = int(rng.integers(0, len(whole)))
        b = min(len(whole), a + int(rng.integers(1, 100)))
        assert np.array_equal(store.read(a, b), whole[a:b])
        most = max(most, len(os.listdir("/proc/self/fd")))
    assert len(store) == len(whole) and most - before <= 8


def test_a_complete_cache_is_read_without_the_build_lock(many: dict) -> None:
    """Another process holding the build lock (e.g. preparing another shard list) does not
    hold up a reader of a complete cache."""
    result: dict = {}

    def read() -> None:
        try:
            it, _ = build_data_iterator(config(many["root"], many["tok"]), global_batch_size=2,
                                        micro_batch_size=2, show_progress=False)
            result["batch"] = next(it)[0]
            result["stats"] = it.cache_index.stats
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e

    with build_lock(many["root"] / "cache"):
        reader = threading.Thread(target=read, daemon=True)
        t0 = time.monotonic()
        reader.start()
        reader.join(timeout=30)
        waited = time.monotonic() - t0
        assert not reader.is_alive(), "the reader waited for the build lock"
    assert "error" not in result, result.get("error")
    ref = stream_of(many["index"])
    assert np.array_equal(result["batch"].numpy().ravel(), ref[:2 * T])
    assert result["stats"]["tokenized_now"] == 0
    print(f"reader of {N_SHARDS} shards returned in {waited:.2f} s with the lock held")


def test_a_changed_shard_invalidates_the_index(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", 40)
    shards = discover_shards(str(tmp_path / "shards" / "*.parquet"))
    tok_dir = str(train_fallback_tokenizer(shards, "text", tmp_path / "tok", vocab_size=300))
    tok = load_tokenizer(tok_dir)

    def epoch() -> tuple[np.ndarray, dict]:
        it, _ = build_data_iterator(config(tmp_path, tok_dir), global_batch_size=1,
                                    micro_batch_size=1, show_progress=False)
        xs = [next(it)[0][0].numpy() for _ in range(it.blocks_per_epoch)]
        return np.concatenate(xs).astype(np.uint32), it.cache_index

    first, index = epoch()
    assert index.stats["tokenized_now"] == 40
    assert np.array_equal(first, stream_of(index)[:len(first)])
    again, index = epoch()
    assert index.stats["tokenized_now"] == 0 and np.array_equal(again, first)

    # Rewritten: new text, new size and mtime. Only that shard is tokenized again, and the
    # iterator reads its new tokens.
    new = ["zebra quartz jukebox.", "vexing fjord nymph."]
    pq.write_table(pa.table({"text": new}), tmp_path / "shards" / "s_7.parquet")
    changed, index = epoch()
    assert index.stats["tokenized_now"] == 1
    entry = index.entries[7]
    start = sum(e.n_tokens for e in index.entries[:7])
    want = np.concatenate([np.array(tok.backend.encode(t, add_special_tokens=False).ids +
                                    [tok.separator_id], np.uint32) for t in new])
    assert entry.n_tokens == len(want)
    assert np.array_equal(changed[start:start + len(want)], want)
    assert np.array_equal(changed, stream_of(index)[:len(changed)])

    # Touched only (same bytes, new mtime): a miss too, since the index cannot tell.
    st = os.stat(tmp_path / "shards" / "s_3.parquet")
    os.utime(tmp_path / "shards" / "s_3.parquet", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched, index = epoch()
    assert index.stats["tokenized_now"] == 1 and np.array_equal(touched, changed)


def test_a_token_file_gone_behind_a_complete_index_is_named(tmp_path: Path) -> None:
    """The reader trusts the index (no stat of every token file); a file removed after prepare
    surfaces as one clear error where it is read, and `prepare` (which re-checks) repairs it."""
    write_shards(tmp_path / "shards", 12)
    shards = discover_shards(str(tmp_path / "shards" / "*.parquet"))
    tok_dir = str(train_fallback_tokenizer(shards, "text", tmp_path / "tok", vocab_size=300))
    index = prepare_cache(shards, load_tokenizer(tok_dir), tmp_path / "cache",
                          encoder="tokenizers", show_progress=False)
    gone = index.token_paths()[5]
    gone.unlink()
    it, _ = build_data_iterator(config(tmp_path, tok_dir), global_batch_size=1,
                                micro_batch_size=1, show_progress=False)
    with pytest.raises(DataError, match=f"{gone}.*argonne-ds prepare"):
        for _ in range(it.blocks_per_epoch):
            next(it)
    again = prepare_cache(shards, load_tokenizer(tok_dir), tmp_path / "cache",
                          encoder="tokenizers", show_progress=False)
    assert again.stats["tokenized_now"] == 1 and gone.is_file()


RANK = r"""
import json, sys
from argonne_ds.data import cache
from argonne_ds.data.cache import load_cache
builds, build = [], cache._build
cache._build = lambda *a, **kw: builds.append(1) or build(*a, **kw)  # count the locked builds
from argonne_ds.data.discovery import discover_shards
from argonne_ds.data.tokenizer import load_tokenizer
shards, tok = discover_shards(sys.argv[1] + "/shards/*.parquet"), load_tokenizer(sys.argv[2])
sys.stdin.readline()
index = load_cache(shards, tok, sys.argv[1] + "/cache", encoder="tokenizers",
                   show_progress=False)
print(json.dumps({"built": index.stats["tokenized_now"], "tokens": index.n_tokens,
                  "builds": len(builds)}))
"""


def test_ranks_on_an_empty_cache_one_builds_the_others_read_its_index(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", 200)
    shards = discover_shards(str(tmp_path / "shards" / "*.parquet"))
    tok_dir = str(train_fallback_tokenizer(shards[:20], "text", tmp_path / "tok", vocab_size=300))
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path), tok_dir],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    for p in procs:  # all at once
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))
    assert sorted(r["built"] for r in results) == [0, 0, 200]
    # The others waited for the builder, then read its index (no second pass over the entries).
    assert [r["builds"] for r in results].count(1) == 1, results
    assert len({r["tokens"] for r in results}) == 1


def test_discovery_by_real_path_in_natural_order(tmp_path: Path) -> None:
    for name in ("a/s_10", "a/s_01", "b/s_1", "a/s_2"):
        (tmp_path / f"{name}.parquet").parent.mkdir(exist_ok=True)
        (tmp_path / f"{name}.parquet").write_bytes(b"x")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "s_3.parquet").symlink_to(tmp_path / "a" / "s_10.parquet")  # a duplicate
    (tmp_path / "c" / "s_4.parquet").symlink_to(tmp_path / "a" / "gone.parquet")  # dangling
    (tmp_path / "c" / "s_5.parquet").mkdir()  # not a file
    shards = discover_shards([str(tmp_path / "c" / "*"), str(tmp_path / "*" / "*.parquet")])
    # s_01 and s_1 tie on the name's natural key: the full path decides.
    assert [os.path.relpath(s.path, tmp_path) for s in shards] == [
        "a/s_01.parquet", "b/s_1.parquet", "a/s_2.parquet", "a/s_10.parquet"]
