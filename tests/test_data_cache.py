"""The token cache: keys, reuse, the on-disk format, and one builder among several processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from argonne_ds.data.cache import TokenStore, prepare_cache
from argonne_ds.data.discovery import discover_shards, natural_key
from argonne_ds.data.tokenizer import load_tokenizer, train_fallback_tokenizer
from argonne_ds.testing import run_distributed_test
from tests.data_helpers import qwen_tokenizer_dir, write_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "shards")
    return tmp_path


def test_natural_order_and_dedup(tmp_path: Path) -> None:
    for name in ("s_10.parquet", "s_2.parquet", "s_1.parquet", "b/s_3.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    shards = discover_shards([str(tmp_path / "*.parquet"), str(tmp_path / "s_1*"),
                              str(tmp_path / "**" / "*.parquet")])
    assert [s.name for s in shards] == ["s_1.parquet", "s_2.parquet", "s_3.parquet",
                                        "s_10.parquet"]
    assert natural_key("000_00010") > natural_key("000_00009")


def test_reuse_and_invalidation(corpus: Path) -> None:
    shards = discover_shards(str(corpus / "shards" / "*.parquet"))
    qwen = load_tokenizer(qwen_tokenizer_dir())
    first = prepare_cache(shards, qwen, corpus / "cache", show_progress=False)
    assert first.stats["tokenized_now"] == 3 and first.stats["empty_docs_skipped"] == 9
    assert prepare_cache(shards, qwen, corpus / "cache").stats["tokenized_now"] == 0
    # A shard rewritten (new mtime) is a miss for that shard only.
    os.utime(shards[1].path, ns=(shards[1].mtime_ns + 10**9, shards[1].mtime_ns + 10**9))
    touched = discover_shards(str(corpus / "shards" / "*.parquet"))
    assert prepare_cache(touched, qwen, corpus / "cache").stats["tokenized_now"] == 1
    # Another tokenizer is a miss for all, and the two caches live side by side.
    other = load_tokenizer(train_fallback_tokenizer(touched, "text", corpus / "tok", 300))
    again = prepare_cache(touched, other, corpus / "cache")
    assert again.stats["tokenized_now"] == 3
    assert len(list((corpus / "cache" / "tokens").glob("*.bin"))) == 3 + 1 + 3
    index = json.loads(next((corpus / "cache").glob("index-*.json")).read_text())
    assert {"entries", "stats", "tokenizer_fingerprint", "separator_id"} <= set(index)


def test_token_files_are_the_documents_in_order(corpus: Path) -> None:
    shards = discover_shards(str(corpus / "shards" / "*.parquet"))
    tok = load_tokenizer(qwen_tokenizer_dir())
    index = prepare_cache(shards, tok, corpus / "cache", show_progress=False)
    store = TokenStore(index.token_paths())
    parts = [np.fromfile(p, dtype=np.uint32) for p in index.token_paths()]
    assert [e.name for e in index.entries] == ["part_1.parquet", "part_2.parquet",
                                               "part_10.parquet"]
    whole = np.concatenate(parts)
    assert len(store) == len(whole) == index.n_tokens
    assert (whole == tok.separator_id).sum() == index.stats["docs"]
    for a, b in ((0, 5), (len(parts[0]) - 3, len(parts[0]) + 3), (len(whole) - 4, len(whole))):
        assert np.array_equal(store.read(a, b), whole[a:b])


def _build_on_every_rank(rank: int, world: int, root: str) -> dict:
    from argonne_ds.data.loader import DataConfig, build_data_iterator

    shards = discover_shards(f"{root}/shards/*.parquet")
    index = prepare_cache(shards, load_tokenizer(qwen_tokenizer_dir()), f"{root}/cache",
                          show_progress=False)
    cfg = DataConfig([f"{root}/shards/*.parquet"], tokenizer_path=qwen_tokenizer_dir(),
                     cache_dir=f"{root}/cache", block_size=16)
    it, _ = build_data_iterator(cfg, global_batch_size=4, micro_batch_size=2, dp_rank=rank,
                                dp_world=world, show_progress=False)
    return {"built": index.stats["tokenized_now"], "batch": next(it)[0].tolist()}


@pytest.mark.distributed
def test_one_process_builds_the_others_wait_and_read(corpus: Path) -> None:
    results = run_distributed_test(_build_on_every_rank, world_size=2, args=(str(corpus),),
                                   timeout_s=120)
    assert sorted(r["built"] for r in results) == [0, 3]  # exactly one rank tokenized
    # Each rank memory-maps the same cache and takes its half of the global batch.
    shards = discover_shards(str(corpus / "shards" / "*.parquet"))
    index = prepare_cache(shards, load_tokenizer(qwen_tokenizer_dir()), corpus / "cache")
    assert index.stats["tokenized_now"] == 0
    store = TokenStore(index.token_paths())
    expected = [store.read(b * 16, b * 16 + 16).tolist() for b in range(4)]
    assert results[0]["batch"] + results[1]["batch"] == expected
