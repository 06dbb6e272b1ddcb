"""Out of memory: the job exits, the relaunch starts with half the micro-batch from the record
written here (`oom_backoff.json` in the output folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from argonne_ds.fileio import write_json_atomic

BACKOFF_FILE = "oom_backoff.json"


def read_backoff(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / BACKOFF_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it (it only caps the "
                         "micro-batch after an out-of-memory error)") from None


def write_backoff(output_dir: str | Path, micro: int, was: int, step: int, rank: int,
                  error: str) -> Path:
    """Record the micro-batch the next launch uses. Any rank that ran out of memory writes it
    (temp file + rename: ranks writing at once leave one whole file)."""
    path = Path(output_dir) / BACKOFF_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"micro_batch_size": micro, "was": was, "step": step, "rank": rank,
                             "error": error[:300], "time": time.time()}, indent=None)
    return path

