"""Tokenizers: local loading, pad token, separator choice, vocab check, the fallback BPE, and
gigatoken == HF tokenizers on the sample corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from argonne_ds.data import DataError
from argonne_ds.data.discovery import discover_shards
from argonne_ds.data.shards import iter_text_batches
from argonne_ds.data.tokenizer import (
    GigatokenEncoder,
    HFEncoder,
    load_hf_tokenizer,
    load_tokenizer,
    train_fallback_tokenizer,
)
from tests.data_helpers import SAMPLE_GLOB, qwen_tokenizer_dir, write_corpus


def test_qwen_loads_offline_with_endoftext_separator() -> None:
    tok = load_tokenizer(qwen_tokenizer_dir(), model_vocab_size=151_936)
    assert tok.separator == "<|endoftext|>" and tok.separator_id == 151_643
    assert tok.vocab_size == 151_669


def test_tokenizer_larger_than_the_model_vocab_is_refused() -> None:
    # argonne2-orig's 151,665 cannot hold the Qwen3 extras (ids up to 151,668).
    with pytest.raises(DataError, match=r"151,669 token ids but the model's vocab_size is 151,665"):
        load_tokenizer(qwen_tokenizer_dir(), model_vocab_size=151_665)


def test_hf_tokenizer_gets_pad_and_block_size(tmp_path: Path) -> None:
    tok = load_hf_tokenizer(qwen_tokenizer_dir(), block_size=1024)
    assert tok.pad_token is not None and tok.model_max_length == 1024
    # A copy whose config has no pad token: one is ensured, reusing <|endoftext|> (no new id).
    copy = tmp_path / "nopad"
    shutil.copytree(qwen_tokenizer_dir(), copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["pad_token"] = None
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_hf_tokenizer(copy, block_size=256)
    assert tok.pad_token == "<|endoftext|>" and len(tok) == 151_669


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tokcorpus")
    write_corpus(root, docs_per_shard=(60, 40, 50))
    return discover_shards(str(root / "*.parquet"))


def test_fallback_bpe_is_deterministic_reused_and_loadable(shards, tmp_path: Path) -> None:
    a = train_fallback_tokenizer(shards, "text", tmp_path / "a", vocab_size=400)
    b = train_fallback_tokenizer(shards, "text", tmp_path / "b", vocab_size=400)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    stamp = (a / "tokenizer.json").stat().st_mtime_ns
    assert train_fallback_tokenizer(shards, "text", tmp_path / "a", vocab_size=400) == a
    assert (a / "tokenizer.json").stat().st_mtime_ns == stamp  # reused, not retrained
    tok = load_tokenizer(a)
    assert tok.separator == "<|endoftext|>" and tok.vocab_size == 400
    hf = load_hf_tokenizer(a, block_size=64)
    assert hf.pad_token == "<|pad|>" and hf.decode(hf("the people")["input_ids"]) == "the people"


def test_separator_falls_back_to_eos(shards, tmp_path: Path) -> None:
    folder = train_fallback_tokenizer(shards, "text", tmp_path, vocab_size=300)
    data = json.loads((folder / "tokenizer.json").read_text())
    for t in data["added_tokens"]:  # rename <|endoftext|> to </s> and declare it eos
        if t["content"] == "<|endoftext|>":
            t["content"] = "</s>"
    vocab = data["model"]["vocab"]
    vocab["</s>"] = vocab.pop("<|endoftext|>")
    (folder / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "</s>"}))
    tok = load_tokenizer(folder)
    assert tok.separator == "</s>" and tok.separator_id == vocab["</s>"]


@pytest.mark.slow
def test_gigatoken_equals_hf_tokenizers_on_the_sample_corpus() -> None:
    tok = load_tokenizer(qwen_tokenizer_dir())
    giga, hf = GigatokenEncoder(tok), HFEncoder(tok)
    total = 0
    for shard in discover_shards(SAMPLE_GLOB):
        for batch in iter_text_batches(shard, "text"):
            a, b = giga.encode(batch.texts), hf.encode(batch.texts)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), shard.name
            total += len(a[0])
    assert total > 5_000_000  # the whole corpus was compared


def test_a_complete_fallback_tokenizer_is_read_without_the_build_lock(
        shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --tokenizer-path every rank resolves the fallback: once it is on disk (published
    whole by a rename), they read it without taking the cache's build lock."""
    import contextlib

    from argonne_ds.data import loader
    from argonne_ds.run_config import DataConfig

    taken: list[Path] = []
    real_lock = loader.build_lock

    @contextlib.contextmanager
    def counting_lock(where: Path):
        taken.append(where)
        with real_lock(where):
            yield

    monkeypatch.setattr(loader, "build_lock", counting_lock)
    cfg = DataConfig(["x"], cache_dir=str(tmp_path), fallback_vocab_size=300)
    first = loader.resolve_tokenizer(cfg, shards)
    assert len(taken) == 1  # trained under the lock
    again = loader.resolve_tokenizer(cfg, shards)
    assert len(taken) == 1 and again.path == first.path  # reused, no lock
