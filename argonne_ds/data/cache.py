"""`argonne-ds prepare`: tokenize each shard once into a memory-mappable uint32 file.

Layout under --cache-dir:
    tokens/<key>.bin     the shard's documents, each followed by the separator (uint32)
    tokens/<key>.json    its entry (counts, status); written last = the completion marker
    index-<list>.json    the whole shard list's entries and totals (for people and tools)
    .prepare.lock        one process builds, the others wait (flock)

<key> hashes the tokenizer files, the separator, the text column and the shard's name, size and
mtime, so a changed file or tokenizer is a cache miss, and appending shards re-uses the rest.
Each .bin is written to a temp name and renamed, then its .json: an interrupted prepare leaves
at most a temp file, which nobody trusts and the next run overwrites.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard, shard_list_fingerprint
from argonne_ds.data.encoding import TOKEN_DTYPE, iter_encoded
from argonne_ds.data.shards import no_good_shards_error
from argonne_ds.data.tokenizer import Encoder, GigatokenEncoder, LoadedTokenizer, make_encoder

logger = logging.getLogger(__name__)


@dataclass
class ShardEntry:
    name: str
    path: str
    key: str
    status: str = "ok"  # "ok" | "skipped" (bad shard under --on-bad-shard skip)
    n_tokens: int = 0
    n_docs: int = 0
    n_skipped_docs: int = 0  # null, empty or whitespace-only texts
    error: str = ""


@dataclass
class CacheIndex:
    cache_dir: str
    entries: list[ShardEntry]
    tokenizer_fingerprint: str
    separator_id: int
    text_column: str
    shard_list: str = ""
    stats: dict = field(default_factory=dict)

    def token_paths(self) -> list[Path]:
        return [Path(self.cache_dir) / "tokens" / f"{e.key}.bin"
                for e in self.entries if e.status == "ok"]

    @property
    def n_tokens(self) -> int:
        return sum(e.n_tokens for e in self.entries)


def shard_key(shard: Shard, tok: LoadedTokenizer, text_column: str) -> str:
    ident = [tok.fingerprint, tok.separator_id, text_column, shard.name, shard.size, shard.mtime_ns]
    stem = Path(shard.name).stem
    return f"{stem}-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]}"


def _write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_entry(tokens_dir: Path, key: str) -> ShardEntry | None:
    """A trusted entry: its marker exists and the token file has exactly the recorded size."""
    meta = tokens_dir / f"{key}.json"
    if not meta.is_file():
        return None
    try:
        entry = ShardEntry(**json.loads(meta.read_text()))
    except (ValueError, TypeError):
        return None
    if entry.status == "ok":
        binf = tokens_dir / f"{key}.bin"
        if not binf.is_file() or binf.stat().st_size != entry.n_tokens * 4:
            return None
    return entry


def _tokenize_shard(shard: Shard, key: str, tokens_dir: Path, text_column: str,
                    encoder: Encoder, progress: object | None) -> ShardEntry:
    entry = ShardEntry(shard.name, shard.path, key)
    tmp = tokens_dir / f"{key}.bin.tmp{os.getpid()}"

    def show(rows: int) -> None:
        if progress is not None:
            progress.set_postfix_str(f"{shard.name} row {rows:,}", refresh=False)

    try:
        counts = None
        if isinstance(encoder, GigatokenEncoder):
            # gigatoken: in its helper processes, whose memory stays bounded.
            from argonne_ds.data import encode_worker

            counts = encode_worker.tokenize_shard(encoder, shard, text_column, str(tmp), show)
        if counts is not None:
            entry.n_tokens, entry.n_docs, entry.n_skipped_docs = counts
        else:
            with open(tmp, "wb") as f:
                done_rows = 0
                for tokens, lengths, _, n_rows, n_skipped in iter_encoded(shard, text_column,
                                                                          encoder):
                    tokens.tofile(f)
                    entry.n_tokens += len(tokens)
                    entry.n_docs += len(lengths)
                    entry.n_skipped_docs += n_skipped
                    done_rows += n_rows
                    show(done_rows)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name says it is complete
        os.replace(tmp, tokens_dir / f"{key}.bin")
    finally:
        for leftover in [tmp, *tokens_dir.glob(f"{tmp.name}.part*")]:  # parts: a dead worker's
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    _write_json_atomic(tokens_dir / f"{key}.json", asdict(entry))
    return entry


@contextlib.contextmanager
def build_lock(cache_dir: Path) -> Iterator[None]:
    """flock: one process (per shared filesystem) builds while the others wait; released by the
    kernel if the holder dies, so a crashed builder never wedges the rest."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".prepare.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_cache(
    shards: Sequence[Shard], tok: LoadedTokenizer, cache_dir: str | Path,
    text_column: str = "text", on_bad_shard: str = "error", encoder: str = "auto",
    show_progress: bool = True,
) -> CacheIndex:
    """Tokenize every shard not yet in the cache; return the index of the whole list."""
    if on_bad_shard not in ("error", "skip"):
        raise ValueError(f"on_bad_shard must be 'error' or 'skip', got {on_bad_shard!r}")
    cache_dir = Path(cache_dir)
    tokens_dir = cache_dir / "tokens"
    with build_lock(cache_dir):
        tokens_dir.mkdir(parents=True, exist_ok=True)
        keys = [shard_key(s, tok, text_column) for s in shards]
        entries: list[ShardEntry | None] = [_read_entry(tokens_dir, k) for k in keys]
        if on_bad_shard == "error":  # a skip recorded by an earlier `skip` run: try (and fail)
            entries = [None if e and e.status == "skipped" else e for e in entries]
        todo = [i for i, e in enumerate(entries) if e is None]
        t0 = time.perf_counter()
        if todo:
            enc = make_encoder(tok, encoder)
            from tqdm import tqdm

            logger.info("prepare: tokenizing %d of %d shards with %s into %s", len(todo),
                        len(shards), enc.name, tokens_dir)
            bar = tqdm(total=sum(shards[i].size for i in todo), unit="B", unit_scale=True,
                       desc="tokenize", disable=not show_progress, mininterval=1.0)
            for i in todo:
                try:
                    entries[i] = _tokenize_shard(shards[i], keys[i], tokens_dir, text_column, enc,
                                                 bar)
                except DataError as e:
                    if on_bad_shard == "error":
                        bar.close()
                        raise
                    logger.warning("skipping bad shard (--on-bad-shard skip): %s", e)
                    entries[i] = ShardEntry(shards[i].name, shards[i].path, keys[i],
                                            status="skipped", error=str(e))
                    _write_json_atomic(tokens_dir / f"{keys[i]}.json", asdict(entries[i]))
                bar.update(shards[i].size)
            bar.close()
            if sys.modules.get("argonne_ds.data.encode_worker"):
                # The helpers hold ~250 MB each: not kept idle beside a training job.
                sys.modules["argonne_ds.data.encode_worker"].close_servers()
        final = [e for e in entries if e is not None]
        elapsed = time.perf_counter() - t0
        new_tokens = sum(final[i].n_tokens for i in todo)
        stats = {
            "shards": len(final), "tokenized_now": len(todo),
            "bad_shards_skipped": sum(e.status == "skipped" for e in final),
            "docs": sum(e.n_docs for e in final),
            "empty_docs_skipped": sum(e.n_skipped_docs for e in final),
            "tokens": sum(e.n_tokens for e in final),
            "seconds": round(elapsed, 3),
            "tokens_per_s": round(new_tokens / elapsed) if todo and elapsed > 0 else None,
        }
        index = CacheIndex(str(cache_dir), final, tok.fingerprint, tok.separator_id, text_column,
                           shard_list_fingerprint(shards), stats)
        _write_json_atomic(cache_dir / f"index-{index.shard_list}.json", asdict(index))
    for e in final:
        if e.status == "skipped":
            logger.warning("bad shard skipped: %s", e.error)
    if all(e.status == "skipped" for e in final):
        raise no_good_shards_error(len(final), final[0].error)
    return index


class TokenStore:
    """The concatenation of the shards' token files as one read-only stream (memory-mapped)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.arrays = [np.memmap(p, dtype=TOKEN_DTYPE, mode="r") if p.stat().st_size else
                       np.empty(0, TOKEN_DTYPE) for p in paths]
        self.starts = [0]
        for a in self.arrays:
            self.starts.append(self.starts[-1] + len(a))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream: a bisect and at most a few slices, O(1) in the
        position (the resume seek)."""
        i = bisect.bisect_right(self.starts, start) - 1
        parts = []
        while start < stop:
            local = start - self.starts[i]
            take = min(stop, self.starts[i + 1]) - start
            parts.append(self.arrays[i][local:local + take])
            start += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
