"""Disk space for checkpoints: is there room for the next save, and did a save fail for want of it.

A save needs its full size free: the previous checkpoint stays until the new one is published.
Its size is the last save's (measured) or, before the first, an estimate from the model: 14 bytes
per parameter in bf16/fp16 (2 for the weights, 12 for the fp32 master and Adam's two moments),
16 in fp32 (benchmarks/checkpoint_io.py measured 14 in bf16). A save that fails because the disk
is full, over quota or read-only raises from deep inside torch's writer, often without an errno
(`basic_ios::clear: iostream error`, `unexpected pos ...` from inline_container.cc): the cause is
read from the error chain, else from the folder's free space after the failure.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from argonne_ds.config import ArgonneConfig

DISK_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "over its quota", errno.EROFS: "read-only"}


def estimate_save_bytes(config: ArgonneConfig, half_precision: bool) -> int:
    from argonne_ds.model.model import count_parameters

    return count_parameters(config)["total"] * (14 if half_precision else 16)


def free_bytes(folder: str | Path) -> int:
    """Free bytes where `folder` is (or would be: its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def gb(n: int | float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def disk_problem(error: BaseException, folder: str | Path, needed: int) -> str | None:
    """Why a save failed, when the disk is why: "full", "over its quota" or "read-only"."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return DISK_ERRNOS[e.errno]
        e = e.__cause__ or e.__context__
    try:
        if not os.access(Path(folder), os.W_OK):
            return "read-only"
        if free_bytes(folder) < max(needed // 10, 1 << 20):  # it filled up during the save
            return "full"
    except OSError:
        return None
    return None
