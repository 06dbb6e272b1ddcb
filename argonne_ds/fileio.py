"""Writing files that other processes, ranks or nodes read while they are written: a temporary
name unique across the hosts sharing a filesystem, then an atomic rename. Standard library only,
so that the CLI's start does not pay for pyarrow or torch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def temp_path(path: Path, suffix: str = "") -> Path:
    """`path`'s sibling `<name><suffix>.tmp-<host>-<pid>`: two nodes on one shared filesystem can
    run processes with the same pid, so the host is part of the name."""
    return path.with_name(f"{path.name}{suffix}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_json_atomic(path: Path, data: object, indent: int | None = 1, sync: bool = False
                      ) -> None:
    """Write `data` as JSON to a temporary name and rename it onto `path`: readers see the old
    file or the whole new one. `sync`: the bytes are on disk before the name says so (for files
    trusted without further checks)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
