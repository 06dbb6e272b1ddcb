"""Checkpoint bookkeeping around DeepSpeed's own save/load: which checkpoints are complete, which
one to resume, rotation. No DeepSpeed import here.

A DeepSpeed checkpoint is a folder `<dir>/global_step<N>/` written by every rank. It counts as
complete only once `argonne_complete.json` exists in it: rank 0 writes that marker last, after a
barrier that every rank reaches only when its own files are on disk. A job killed mid-save leaves
a folder without the marker, which resume skips and rotation removes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
MARKER = "argonne_complete.json"
TAG_RE = re.compile(r"global_step(\d+)")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.fullmatch(tag)
    return int(m.group(1)) if m else None


def write_marker(directory: Path, tag: str, info: dict[str, Any]) -> None:
    path = Path(directory) / tag / MARKER
    tmp = path.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps({**info, "tag": tag, "time": time.time()}, indent=1))
    os.replace(tmp, path)


def list_tags(directory: Path) -> tuple[list[str], list[str]]:
    """(complete, incomplete) checkpoint tags under `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return [], []
    tags = sorted((p.name for p in directory.iterdir()
                   if p.is_dir() and step_of(p.name) is not None), key=lambda t: step_of(t) or 0)
    complete = [t for t in tags if (directory / t / MARKER).is_file()]
    return complete, [t for t in tags if t not in complete]


def resume_candidates(directory: Path) -> list[str]:
    """Complete tags, newest first (the caller falls back down the list if a load fails)."""
    complete, incomplete = list_tags(directory)
    newest_complete = step_of(complete[-1]) if complete else -1
    for tag in incomplete:
        if (step_of(tag) or 0) > newest_complete:
            logger.warning("checkpoint %s/%s is incomplete (no %s): a save was interrupted; "
                           "resuming from an earlier one", directory, tag, MARKER)
    return list(reversed(complete))


def split_checkpoint_path(path: str | Path) -> tuple[Path, str | None]:
    """`--checkpoint-path` may name a checkpoints folder (-> its newest complete tag) or one tag."""
    path = Path(path)
    if step_of(path.name) is not None:
        return path.parent, path.name
    return path, None


def rotate(directory: Path, keep: int) -> list[str]:
    """Keep the newest `keep` complete checkpoints; drop older ones and stale partial saves."""
    if keep <= 0:
        return []
    complete, incomplete = list_tags(directory)
    newest = step_of(complete[-1]) if complete else -1
    doomed = complete[:-keep] + [t for t in incomplete if (step_of(t) or 0) < newest]
    for tag in doomed:
        shutil.rmtree(Path(directory) / tag, ignore_errors=True)
    return doomed
