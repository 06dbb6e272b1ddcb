"""Find the shards: globs -> existing files, deduplicated, in natural numeric order."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from argonne_ds.data import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    path: str
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> list[int | str]:
    """'shard_2' < 'shard_10': digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(text)]


def discover_shards(globs: str | Sequence[str]) -> list[Shard]:
    """Every file matched by `globs`, each once (by real path), sorted naturally by name (then
    by full path).

    Every rank does this at start-up, over up to 100k+ shards: one lstat per file (a regular
    file's is its stat), the real path from its folder's (resolved once per folder), and the full
    path's sort key only where names tie.
    """
    patterns = [globs] if isinstance(globs, str) else list(globs)
    if not patterns:
        raise DataError("no --data-glob given: pass one or more globs, e.g. 'data/*.parquet'")
    found: dict[str, Shard] = {}
    real_dirs: dict[str, str] = {}
    for pattern in patterns:
        for p in glob.glob(os.path.expanduser(pattern), recursive=True):
            try:
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    real, st = os.path.realpath(p), os.stat(p)
                else:
                    folder, name = os.path.split(p)
                    if folder not in real_dirs:
                        real_dirs[folder] = os.path.realpath(folder or ".")
                    real = os.path.join(real_dirs[folder], name)
            except OSError:  # a dangling symlink, or gone since the glob
                continue
            if stat.S_ISREG(st.st_mode) and real not in found:
                found[real] = Shard(path=real, size=st.st_size, mtime_ns=st.st_mtime_ns)
    if not found:
        raise DataError(
            f"--data-glob {' '.join(patterns)!s} matched no files: check the path and quote the "
            "glob so the shell does not expand it"
        )
    shards = list(found.values())
    by_name = [natural_key(s.name) for s in shards]
    ties = Counter(map(tuple, by_name))  # natural keys: 's_01' and 's_1' tie too
    keys = [(k, natural_key(s.path) if ties[tuple(k)] > 1 else [])
            for k, s in zip(by_name, shards)]
    return [shards[i] for i in sorted(range(len(shards)), key=keys.__getitem__)]


def shard_list_fingerprint(shards: Iterable[Shard]) -> str:
    """Names, sizes and mtimes, in order: what must not change under a resumed run."""
    items = [(s.name, s.size, s.mtime_ns) for s in shards]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def describe_plan(shards: Sequence[Shard]) -> str:
    total = sum(s.size for s in shards)
    first, last = shards[0].name, shards[-1].name
    where = os.path.dirname(shards[0].path) or "."
    return (f"{len(shards)} shards, {total / 1e6:,.1f} MB, {first} .. {last} "
            f"(natural order; in {where})")


def shard_dicts(shards: Sequence[Shard]) -> list[dict]:
    return [asdict(s) | {"name": s.name} for s in shards]


