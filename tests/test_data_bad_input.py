"""Bad input: each broken shard ends in one DataError naming the file and the problem, or, under
--on-bad-shard skip, in a counted skip with a warning; the cache is never left corrupt."""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from argonne_ds.cli import main as cli_main
from argonne_ds.data import DataError, discovery
from argonne_ds.data.cache import CacheIndex, ShardEntry, TokenStore, prepare_cache
from argonne_ds.data.discovery import discover_shards
from argonne_ds.data.loader import DataConfig, build_data_iterator
from argonne_ds.data.tokenizer import load_tokenizer
from tests.data_helpers import SAMPLE_GLOB, WORDS, qwen_tokenizer_dir, write_corpus

T = 16
SEP = 151643
BAD = "part_2.parquet"  # between the good part_1 and part_3 in natural order


# ---- the bad shards ---------------------------------------------------------------------------


def _truncated(path: Path) -> None:
    real = Path(sorted(glob.glob(SAMPLE_GLOB))[0]).read_bytes()
    path.write_bytes(real[:len(real) // 2])  # an interrupted copy: no footer


def _not_parquet(path: Path) -> None:
    path.write_text("id,text\n1,a CSV file given the wrong name\n")


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _int_column(path: Path) -> None:
    pq.write_table(pa.table({"text": pa.array([1, 2, 3], pa.int64())}), path)


def _no_rows(path: Path) -> None:
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)


def _other_column(path: Path) -> None:
    pq.write_table(pa.table({"body": ["a document under another name."]}), path)


def _corrupt_pages(path: Path) -> None:
    """A valid footer over a damaged row group in the middle: the error comes mid-read, after the
    first batches were tokenized (into the temp file, in prepare)."""
    texts = [f"row {i}." for i in range(20_000)]  # 8192 rows a batch: row group 3 is later
    pq.write_table(pa.table({"text": texts}), path, row_group_size=4000)
    col = pq.ParquetFile(path).metadata.row_group(3).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    lo, n = start + col.total_compressed_size // 4, col.total_compressed_size // 2
    data[lo:lo + n] = b"\xab" * n
    path.write_bytes(bytes(data))


# kind -> (writer, what the message must say)
BAD_KINDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncated, r"not a readable parquet file \(.*magic bytes"),
    "not_parquet": (_not_parquet, r"not a readable parquet file"),
    "zero_bytes": (_zero_bytes, r"not a readable parquet file \(.*0 bytes"),
    "int_column": (_int_column, r"column 'text' has type int64, not text; pass --text-column"),
    "no_rows": (_no_rows, r"has no rows"),
    "other_column": (_other_column, r"no column 'text' \(columns: body\); pass --text-column"),
    "corrupt_pages": (_corrupt_pages, r"unreadable at row \d+ \("),
}


# ---- helpers ----------------------------------------------------------------------------------


@functools.cache
def hf_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(f"{qwen_tokenizer_dir()}/tokenizer.json")


def reference(texts_per_shard: list[list]) -> np.ndarray:
    """Independent of the package: each kept document's ids + the separator, in order."""
    kept = [t for texts in texts_per_shard for t in texts if t is not None and t.strip()]
    ids: list[int] = []
    for enc in hf_tokenizer().encode_batch_fast(kept, add_special_tokens=False):
        ids += enc.ids + [SEP]
    return np.array(ids, dtype=np.int64)


def corpus(root: Path, bad: str | None = None) -> list[list]:
    """part_1 and part_3 good (with a few null/blank texts), part_2 of the given bad kind."""
    texts = write_corpus(root / "shards", docs_per_shard=(17, 23), names=("part_1", "part_3"))
    if bad:
        BAD_KINDS[bad][0](root / "shards" / BAD)
    return texts


def config(root: Path, cache: bool, **kw) -> DataConfig:
    kw.setdefault("tokenizer_path", qwen_tokenizer_dir())
    return DataConfig([str(root / "shards" / "*.parquet")],
                      cache_dir=str(root / "cache") if cache else None, block_size=T, **kw)


def make(root: Path, cache: bool, **kw):
    it, _ = build_data_iterator(config(root, cache, **kw), global_batch_size=1,
                                micro_batch_size=1, show_progress=False)
    return it


def epoch_blocks(it, ref: np.ndarray) -> None:
    """The iterator's first epoch is exactly the packed reference stream."""
    n = (len(ref) - 1) // T
    assert it.blocks_per_epoch in (None, n)
    for b in range(n):
        x, y = next(it)
        assert np.array_equal(x[0].numpy(), ref[b * T:b * T + T]), b
        assert np.array_equal(y[0].numpy(), ref[b * T + 1:b * T + T + 1]), b


def drain(it, n: int = 20_000) -> None:
    for _ in range(n):
        next(it)


def index_file(root: Path) -> dict:
    (path,) = (root / "cache").glob("index-*.json")
    return json.loads(path.read_text())


def prepare(root: Path, on_bad_shard: str = "error", **kw) -> CacheIndex:
    shards = discover_shards(str(root / "shards" / "*.parquet"))
    return prepare_cache(shards, load_tokenizer(qwen_tokenizer_dir()), root / "cache",
                         on_bad_shard=on_bad_shard, show_progress=False, **kw)


def check_cache_is_whole(root: Path, skipped: bool = False) -> None:
    """Every token file has its marker and the recorded size; no temp file; of part_2 nothing,
    or (skipped) only its marker saying so."""
    tokens = root / "cache" / "tokens"
    names = sorted(p.name for p in tokens.iterdir())
    assert not [n for n in names if ".tmp" in n], names
    bad = [n for n in names if n.startswith("part_2-")]
    assert len(bad) == skipped and all(n.endswith(".json") for n in bad), names
    for n in bad:
        assert json.loads((tokens / n).read_text())["status"] == "skipped"
    for b in tokens.glob("*.bin"):
        entry = ShardEntry(**json.loads(b.with_suffix(".json").read_text()))
        assert entry.status == "ok" and b.stat().st_size == 4 * entry.n_tokens


# ---- each bad kind, in both modes -------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "stream"])
@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_shard_is_one_clear_error(tmp_path: Path, kind: str, cache: bool) -> None:
    corpus(tmp_path, kind)
    with pytest.raises(DataError) as err:
        drain(make(tmp_path, cache))  # streaming meets damaged pages only when it reads them
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "shards" / BAD)), msg
    assert re.search(BAD_KINDS[kind][1], msg), msg
    assert "--on-bad-shard skip" in msg or "--text-column" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "stream"])
@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_shard_is_skipped_counted_and_the_rest_used(
    tmp_path: Path, kind: str, cache: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    texts = corpus(tmp_path, kind)
    with caplog.at_level(logging.WARNING):
        it = make(tmp_path, cache, on_bad_shard="skip")
        epoch_blocks(it, reference(texts))  # exactly part_1 then part_3
    assert any(r.levelno == logging.WARNING and BAD in r.getMessage() for r in caplog.records)
    if cache:
        index = index_file(tmp_path)
        assert index["stats"]["bad_shards_skipped"] == 1 and index["stats"]["shards"] == 3
        (bad,) = [e for e in index["entries"] if e["name"] == BAD]
        assert bad["status"] == "skipped" and re.search(BAD_KINDS[kind][1], bad["error"])
        check_cache_is_whole(tmp_path, skipped=True)
    elif kind == "corrupt_pages":  # its footer is sound: found when streaming reaches it
        assert any("found while streaming" in r.getMessage() and BAD in r.getMessage()
                   and re.search(BAD_KINDS[kind][1], r.getMessage()) for r in caplog.records)
    else:
        assert any("1 of 3 shards skipped" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "stream"])
def test_every_shard_bad_under_skip_is_an_error(tmp_path: Path, cache: bool) -> None:
    (tmp_path / "shards").mkdir()
    _not_parquet(tmp_path / "shards" / "a.parquet")
    _no_rows(tmp_path / "shards" / "b.parquet")
    with pytest.raises(DataError, match=r"every one of the 2 shards is bad.*a\.parquet: not a "):
        make(tmp_path, cache, on_bad_shard="skip")


def test_text_column_names_the_right_column(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    for i in (1, 2):
        pq.write_table(pa.table({"body": [f"document {i}, once.", None, "two words"] * 5}),
                       tmp_path / "shards" / f"s{i}.parquet")
    with pytest.raises(DataError, match=r"s1\.parquet: no column 'text' \(columns: body\)"):
        make(tmp_path, True)
    for cache in (True, False):
        it = make(tmp_path, cache, text_column="body")
        epoch_blocks(it, reference([["document 1, once.", "two words"] * 5,
                                    ["document 2, once.", "two words"] * 5]))


# ---- texts that are not errors ----------------------------------------------------------------


def test_null_and_empty_texts_are_skipped_and_counted(tmp_path: Path) -> None:
    texts = corpus(tmp_path)  # part_1 (17 docs) and part_3 (23): 3 null/blank texts each
    blank = [None, "", " ", "\n\t", None]
    pq.write_table(pa.table({"text": pa.array(blank, pa.string())}), tmp_path / "shards" / BAD)
    # An all-None column written by pandas has arrow type null: all its texts are null.
    pq.write_table(pa.table({"text": pa.array([None] * 4)}), tmp_path / "shards" / "part_4.parquet")
    index = prepare(tmp_path)
    got = [(e.name, e.status, e.n_docs, e.n_skipped_docs) for e in index.entries]
    assert got == [("part_1.parquet", "ok", 17, 3), (BAD, "ok", 0, 5),
                   ("part_3.parquet", "ok", 23, 3), ("part_4.parquet", "ok", 0, 4)]
    assert [e.n_tokens for e in index.entries][1::2] == [0, 0]
    s = index.stats
    assert (s["docs"], s["empty_docs_skipped"], s["bad_shards_skipped"]) == (40, 15, 0)
    ref = reference(texts)
    assert s["tokens"] == len(ref)
    for cache in (True, False):
        epoch_blocks(make(tmp_path, cache), ref)


def test_a_ten_megabyte_document(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), 2_200_000)]
    text = " ".join(words.tolist())[:10 * 2**20] + "."
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"text": [text]}), tmp_path / "shards" / "big.parquet")
    index = prepare(tmp_path)  # the default (fastest) encoder
    (want,) = hf_tokenizer().encode_batch_fast([text], add_special_tokens=False)
    (entry,) = index.entries
    assert (entry.n_docs, entry.n_tokens) == (1, len(want.ids) + 1)
    got = TokenStore(index.token_paths()).read(0, entry.n_tokens)
    assert np.array_equal(got, np.array(want.ids + [SEP], np.uint32))
    x, y = next(make(tmp_path, cache=False))  # streaming takes it too
    assert np.array_equal(x[0].numpy(), want.ids[:T]) and np.array_equal(y[0].numpy(),
                                                                         want.ids[1:T + 1])


# ---- never a corrupt cache --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["corrupt_pages", "truncated"])
def test_failed_prepare_keeps_finished_shards_and_no_partial_file(tmp_path: Path, kind: str
                                                                  ) -> None:
    texts = corpus(tmp_path, kind)
    with pytest.raises(DataError, match=re.escape(BAD)):
        prepare(tmp_path)
    check_cache_is_whole(tmp_path)
    (done,) = (tmp_path / "cache" / "tokens").glob("part_1-*.bin")  # finished before part_2
    mtime = done.stat().st_mtime_ns
    (tmp_path / "shards" / BAD).unlink()
    index = prepare(tmp_path)
    assert index.stats["tokenized_now"] == 1 and index.stats["shards"] == 2  # part_3 only
    assert done.stat().st_mtime_ns == mtime
    tokens = TokenStore(index.token_paths())
    assert np.array_equal(tokens.read(0, len(tokens)), reference(texts))


def test_a_skip_is_not_inherited_by_an_error_run(tmp_path: Path) -> None:
    texts = corpus(tmp_path, "truncated")
    assert prepare(tmp_path, "skip").stats["bad_shards_skipped"] == 1
    assert prepare(tmp_path, "skip").stats["tokenized_now"] == 0  # the skip is remembered
    with pytest.raises(DataError, match=re.escape(BAD) + ": not a readable parquet file"):
        prepare(tmp_path, "error")
    good = ["a repaired shard.", "with two documents."]
    pq.write_table(pa.table({"text": good}), tmp_path / "shards" / BAD)  # new size and mtime
    index = prepare(tmp_path, "error")
    assert index.stats["tokenized_now"] == 1 and index.stats["bad_shards_skipped"] == 0
    tokens = TokenStore(index.token_paths())
    assert np.array_equal(tokens.read(0, len(tokens)), reference([texts[0], good, texts[1]]))


def _damage(tokens: Path, key: str, how: str) -> None:
    binf, meta = tokens / f"{key}.bin", tokens / f"{key}.json"
    if how == "temp_left_over":  # killed while writing: only the temp file exists
        binf.rename(tokens / f"{key}.bin.tmp123")
        meta.unlink()
    elif how == "bin_without_marker":  # killed between the rename and the marker
        meta.unlink()
    elif how == "bin_short":
        binf.write_bytes(binf.read_bytes()[:-4])
    elif how == "bin_long":
        binf.write_bytes(binf.read_bytes() + b"\0\0\0\0")
    elif how == "marker_garbled":
        meta.write_text(meta.read_text()[:20])


@pytest.mark.parametrize("how", ["temp_left_over", "bin_without_marker", "bin_short", "bin_long",
                                 "marker_garbled"])
def test_an_interrupted_shard_is_not_trusted_but_rebuilt(tmp_path: Path, how: str) -> None:
    corpus(tmp_path)
    first = prepare(tmp_path)
    tokens = tmp_path / "cache" / "tokens"
    key = first.entries[1].key  # part_3
    want = (tokens / f"{key}.bin").read_bytes()
    _damage(tokens, key, how)
    again = prepare(tmp_path)
    assert again.stats["tokenized_now"] == 1
    assert again.entries[1] == first.entries[1]
    assert (tokens / f"{key}.bin").read_bytes() == want


# ---- the fallback tokenizer -------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "stream"])
def test_fallback_tokenizer_trains_around_a_skipped_shard(
    tmp_path: Path, cache: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # streaming keeps the fallback in ./.argonne_cache
    corpus(tmp_path, "not_parquet")
    with pytest.raises(DataError, match=re.escape(BAD)):
        make(tmp_path, cache, tokenizer_path=None, fallback_vocab_size=300)
    it = make(tmp_path, cache, tokenizer_path=None, fallback_vocab_size=300,
              on_bad_shard="skip")
    x, _ = next(it)
    assert x.shape == (1, T)


# ---- the CLI ----------------------------------------------------------------------------------


def prepare_args(root: Path, *extra: str) -> list[str]:
    return ["prepare", "--data-glob", str(root / "shards" / "*.parquet"), "--tokenizer-path",
            qwen_tokenizer_dir(), "--cache-dir", str(root / "cache"), "--no-progress", *extra]


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and stderr.splitlines()[-1] == lines[0], stderr
    assert lines[0].startswith("argonne-ds prepare: error: ")
    return lines[0]


def test_cli_bad_shard_exit_2_one_line_then_skip(tmp_path: Path, capsys) -> None:
    corpus(tmp_path, "truncated")
    assert cli_main(prepare_args(tmp_path)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert BAD in line and "not a readable parquet file" in line and "--on-bad-shard skip" in line
    assert cli_main(prepare_args(tmp_path, "--on-bad-shard", "skip")) == 0
    out = capsys.readouterr().out
    assert "(2 tokenized now" in out and "1 bad skipped" in out and "6 empty skipped" in out


def test_cli_missing_column_then_text_column(tmp_path: Path, capsys) -> None:
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"body": ["some text.", None]}), tmp_path / "shards" / "s.parquet")
    assert cli_main(prepare_args(tmp_path)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "s.parquet: no column 'text' (columns: body); pass --text-column" in line
    assert cli_main(prepare_args(tmp_path, "--text-column", "body")) == 0
    assert "1 documents, 1 empty skipped" in capsys.readouterr().out


def test_cli_folds_a_multi_line_message_into_one(tmp_path: Path, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(globs: object) -> None:
        raise DataError("x.parquet: what pyarrow said,\n  over two lines")

    monkeypatch.setattr(discovery, "discover_shards", fail)
    assert cli_main(prepare_args(tmp_path)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith("error: x.parquet: what pyarrow said, over two lines")


def test_cli_in_a_subprocess_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    corpus(tmp_path, "not_parquet")
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "argonne_ds.cli", *prepare_args(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"{tmp_path / 'shards' / BAD}: not a readable parquet file" in line
