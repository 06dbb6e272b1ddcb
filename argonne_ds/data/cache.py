"""`argonne-ds prepare`: tokenize each shard once into a memory-mappable uint32 file.

Layout under --cache-dir:
    tokens/<key>.bin          the shard's documents, each followed by the separator (uint32)
    tokens/<key>.json         its entry (counts, status); written last = the completion marker
    index-<list>-<tok>.json   the whole shard list's entries and totals, written last of all
    .prepare.lock             one process builds, the others wait (flock)

<key> hashes the tokenizer files, the separator, the text column and the shard's name, size and
mtime, so a changed file or tokenizer is a cache miss, and appending shards re-uses the rest.
Each .bin is written to a temp name and renamed, then its .json: an interrupted prepare leaves
at most a temp file, which nobody trusts and the next run overwrites.

<list> hashes every shard's name, size and mtime in order, and <tok> the tokenizer, separator
and text column: the index of exactly one shard list and tokenization, complete by construction
(written atomically after every shard's files). Training ranks (`load_cache`) read it without a
lock: one file read per rank, whatever the number of ranks; a shard changed since is another
<list>, so a stale index is never found. `argonne-ds prepare` (`prepare_cache`) re-checks every
shard's entry and token file under the lock.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard, shard_list_fingerprint
from argonne_ds.data.encoding import TOKEN_DTYPE, iter_encoded
from argonne_ds.data.shards import no_good_shards_error
from argonne_ds.data.tokenizer import Encoder, GigatokenEncoder, LoadedTokenizer, make_encoder
from argonne_ds.fileio import temp_path, write_json_atomic

logger = logging.getLogger(__name__)
_TOKEN_BYTES = np.dtype(TOKEN_DTYPE).itemsize


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

    def token_files(self) -> tuple[list[str], list[int]]:
        """The token files and their token counts (from the index: no file is opened)."""
        ok = [e for e in self.entries if e.status == "ok"]
        tokens = os.path.join(self.cache_dir, "tokens")
        return [os.path.join(tokens, f"{e.key}.bin") for e in ok], [e.n_tokens for e in ok]

    @property
    def n_tokens(self) -> int:
        return sum(e.n_tokens for e in self.entries)


def shard_key(shard: Shard, tok: LoadedTokenizer, text_column: str) -> str:
    ident = [tok.fingerprint, tok.separator_id, text_column, shard.name, shard.size, shard.mtime_ns]
    stem = Path(shard.name).stem
    return f"{stem}-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]}"


def index_path(cache_dir: Path, shard_list: str, tok: LoadedTokenizer, text_column: str
               ) -> Path:
    ident = json.dumps([tok.fingerprint, tok.separator_id, text_column]).encode()
    return cache_dir / f"index-{shard_list}-{hashlib.sha256(ident).hexdigest()[:8]}.json"


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
    tmp = temp_path(tokens_dir / f"{key}.bin")

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
    except BaseException:
        # A dead helper's parts (on success they are gone): looked for only here, since a glob
        # lists the whole folder, which holds two files per shard.
        for leftover in [tmp, *tokens_dir.glob(f"{tmp.name}.part*")]:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        raise
    write_json_atomic(tokens_dir / f"{key}.json", asdict(entry))
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
    """Tokenize every shard not yet in the cache; return the index of the whole list. Re-checks
    every shard's entry and token file under the build lock (`argonne-ds prepare`); training
    ranks call `load_cache`."""
    _check_on_bad_shard(on_bad_shard)
    cache_dir = Path(cache_dir)
    with build_lock(cache_dir):
        index = _build(shards, tok, cache_dir, text_column, on_bad_shard, encoder, show_progress)
    return _reported(index)


def load_cache(
    shards: Sequence[Shard], tok: LoadedTokenizer, cache_dir: str | Path,
    text_column: str = "text", on_bad_shard: str = "error", encoder: str = "auto",
    show_progress: bool = True,
) -> CacheIndex:
    """What each training rank calls: the complete index of exactly this shard list and
    tokenization, read without any lock: one file per rank, however many ranks. Only when there
    is none (or it is unreadable) does it build as `prepare_cache` does: one process builds, the
    others wait on the lock, then read the index it wrote (again without the lock)."""
    _check_on_bad_shard(on_bad_shard)
    cache_dir = Path(cache_dir)
    shard_list = shard_list_fingerprint(shards)
    path = index_path(cache_dir, shard_list, tok, text_column)
    for _ in range(3):
        t0 = time.perf_counter()
        seen = _stamp(path)
        index = _read_index(path, shards, shard_list, tok, text_column, on_bad_shard)
        if index is not None:
            index.cache_dir = str(cache_dir)  # as this process names it (mounts differ)
            index.stats |= {"tokenized_now": 0, "seconds": round(time.perf_counter() - t0, 3),
                            "tokens_per_s": None}
            return _reported(index)
        with build_lock(cache_dir):
            if _stamp(path) == seen:  # nobody wrote it while we waited: build it here
                return _reported(_build(shards, tok, cache_dir, text_column, on_bad_shard,
                                        encoder, show_progress))
        # Another process wrote it while we waited: read that, outside the lock (waiting ranks
        # do not read it one after another).
    with build_lock(cache_dir):  # rewritten under us again and again: settle it here
        return _reported(_build(shards, tok, cache_dir, text_column, on_bad_shard, encoder,
                                show_progress))


def _check_on_bad_shard(on_bad_shard: str) -> None:
    if on_bad_shard not in ("error", "skip"):
        raise ValueError(f"on_bad_shard must be 'error' or 'skip', got {on_bad_shard!r}")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which file `path` names now: a rewrite (new file renamed over it) changes it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read_index(path: Path, shards: Sequence[Shard], shard_list: str, tok: LoadedTokenizer,
                text_column: str, on_bad_shard: str) -> CacheIndex | None:
    """The index at `path` if it is for exactly these shards (names, sizes and mtimes, in order:
    `shard_list`) and this tokenization; else None. It is only ever replaced whole (rename), so
    no lock is needed to read it."""
    try:
        data = json.loads(path.read_bytes())
        entries = [ShardEntry(**e) for e in data.pop("entries")]
        index = CacheIndex(entries=entries, **data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        logger.warning("token cache index %s is unreadable (%s); checking the cache shard by "
                       "shard", path, e)
        return None
    mine = (shard_list, tok.fingerprint, tok.separator_id, text_column)
    if ((index.shard_list, index.tokenizer_fingerprint, index.separator_id,
         index.text_column) != mine or [e.name for e in entries] != [s.name for s in shards]):
        return None
    if on_bad_shard == "error" and any(e.status == "skipped" for e in entries):
        return None  # a skip recorded under `skip`: the build tries that shard (and fails)
    return index


def _build(shards: Sequence[Shard], tok: LoadedTokenizer, cache_dir: Path, text_column: str,
           on_bad_shard: str, encoder: str, show_progress: bool) -> CacheIndex:
    """Under the build lock: check every shard's entry, tokenize the missing, write the index."""
    tokens_dir = cache_dir / "tokens"
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
                write_json_atomic(tokens_dir / f"{keys[i]}.json", asdict(entries[i]))
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
    shard_list = shard_list_fingerprint(shards)
    index = CacheIndex(str(cache_dir), final, tok.fingerprint, tok.separator_id, text_column,
                       shard_list, stats)
    write_json_atomic(index_path(cache_dir, shard_list, tok, text_column), asdict(index),
                       sync=True)
    return index


def _reported(index: CacheIndex) -> CacheIndex:
    for e in index.entries:
        if e.status == "skipped":
            logger.warning("bad shard skipped: %s", e.error)
    if all(e.status == "skipped" for e in index.entries):
        raise no_good_shards_error(len(index.entries), index.entries[0].error)
    return index


class TokenStore:
    """The concatenation of the shards' token files as one read-only stream.

    Files are opened when first read, and at most `max_open` stay open (the least recently read
    is dropped first): a memory mapping holds a file descriptor (CPython's mmap keeps a dup of
    it until the mapping is freed), and 100k shards must not take 100k of them. A file of at
    most `read_whole_bytes` is read whole instead (one pread, no descriptor kept): mapping and
    unmapping costs ~4x more than reading a small file, and per-shard costs are what remains of
    an epoch over many tiny shards. With `lengths` (token counts, from the index) no file is
    even stat'ed up front.
    """

    def __init__(self, paths: Sequence[str | Path], lengths: Sequence[int] | None = None,
                 max_open: int = 64, read_whole_bytes: int = 256 * 2**10) -> None:
        self.paths = [str(p) for p in paths]
        if lengths is None:
            lengths = [os.stat(p).st_size // _TOKEN_BYTES for p in self.paths]
        if len(lengths) != len(self.paths):
            raise ValueError(f"{len(self.paths)} token files but {len(lengths)} lengths")
        self.lengths = list(lengths)
        self.starts = [0, *itertools.accumulate(self.lengths)]
        self.max_open = max(1, max_open)
        self.read_whole_bytes = read_whole_bytes
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

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
            if take > 0:  # an empty file is never opened (mmap refuses length 0)
                parts.append(self._array(i)[local:local + take])
            start += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _array(self, i: int) -> np.ndarray:
        a = self._open.get(i)
        if a is not None:
            self._open.move_to_end(i)
            return a
        a = self._load(i)
        self._open[i] = a
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)  # a mapping's descriptor closes with its last view
        return a

    def _load(self, i: int) -> np.ndarray:
        path, n = self.paths[i], self.lengths[i]
        try:
            if n * _TOKEN_BYTES <= self.read_whole_bytes:
                fd = os.open(path, os.O_RDONLY)
                try:
                    data = os.pread(fd, n * _TOKEN_BYTES + 1, 0)  # a byte more: longer shows
                finally:
                    os.close(fd)
                if len(data) == n * _TOKEN_BYTES:
                    return np.frombuffer(data, TOKEN_DTYPE)
                size = os.stat(path).st_size
            else:
                a = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
                if len(a) == n:
                    return a
                size = len(a) * _TOKEN_BYTES
            why = f"{size:,} bytes, the index says {n:,} tokens of {_TOKEN_BYTES}"
        except (OSError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
        cache = os.path.dirname(os.path.dirname(path)) or "."
        raise DataError(f"{path}: token file missing or changed since the cache was prepared "
                        f"({why}); run `argonne-ds prepare` on {cache} again (it re-checks "
                        "every token file and re-tokenizes what is missing)")
