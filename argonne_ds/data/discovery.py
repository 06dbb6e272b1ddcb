"""Find the shards: globs -> existing files, deduplicated, in natural numeric order."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
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


def natural_key(text: str) -> list[int | str]:
    """'shard_2' < 'shard_10': digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def discover_shards(globs: str | Sequence[str]) -> list[Shard]:
    """Every file matched by `globs`, each once, sorted naturally by name (then by full path)."""
    patterns = [globs] if isinstance(globs, str) else list(globs)
    if not patterns:
        raise DataError("no --data-glob given: pass one or more globs, e.g. 'data/*.parquet'")
    found: dict[str, str] = {}
    for pattern in patterns:
        for p in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isfile(p):
                found.setdefault(os.path.realpath(p), p)
    if not found:
        raise DataError(
            f"--data-glob {' '.join(patterns)!s} matched no files: check the path and quote the "
            "glob so the shell does not expand it"
        )
    paths = sorted(found, key=lambda p: (natural_key(os.path.basename(p)), natural_key(p)))
    shards = []
    for p in paths:
        st = os.stat(p)
        shards.append(Shard(path=p, size=st.st_size, mtime_ns=st.st_mtime_ns))
    return shards


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


