"""Joining and leaving a process group, the same way in the trainer, the CLI and the tests.

DeepSpeed is imported inside the functions that need it, so the test harness and the CLI can
import this module cheaply; engine.py stays the door for everything else DeepSpeed does.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from argonne_ds.reliability.exits import run_exit_hooks


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The OS picks it (bind to port 0). Another process could take it before rank 0's store binds
    it; that window is tiny, and a fixed port would collide far more often (parallel jobs, a
    previous run's socket in TIME_WAIT).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def skip_shm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its ``deepspeed_shm_comm`` op at ``init_distributed``.

    On CPU every ``init_distributed`` builds that op (~20 s on a cold cache) although it only
    serves inference all-reduce. ``TorchBackend.__init__`` calls the module-level
    ``build_shm_op`` and treats ``None`` as "no shm op" (``inference_all_reduce`` then falls back
    to ``torch.distributed.all_reduce``), so replacing it with a function returning ``None`` is
    safe. Call this before ``deepspeed.init_distributed``.
    """
    # ``import deepspeed.comm.torch as m`` would bind the ``torch`` package, because
    # ``deepspeed.comm`` re-exports ``torch``; import_module returns the submodule itself.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    ds_comm_torch.build_shm_op = _no_shm_op


def _no_shm_op() -> None:
    return None


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join (or create) the process group. On CPU, use gloo and skip the shm op's JIT build."""
    if dist.is_initialized():
        return
    import deepspeed

    if not torch.cuda.is_available():
        skip_shm_build()
    if "RANK" not in os.environ:  # plain `python` without a launcher: one process
        port = os.environ.get("MASTER_PORT") or str(free_port())  # two such jobs can coexist
        for var, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                             ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port)):
            os.environ.setdefault(var, default)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank, for decisions taken before an Engine exists."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(code: int, clean: bool = True) -> NoReturn:
    """Leave the process group and exit with `code`, skipping interpreter teardown.

    On CPU, 2-rank gloo jobs otherwise abort at exit in about one run in three ("terminate called
    without an active exception", SIGABRT) and the launcher reports the job failed. The barrier
    keeps a fast rank from tearing gloo down while a peer is still in a collective; after an
    error (`clean=False`) the peers may never arrive, so it is skipped.
    """
    run_exit_hooks()  # a checkpoint being written in the background is finished first
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if dist.is_available() and dist.is_initialized():
        if clean:
            with contextlib.suppress(Exception):
                dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    os._exit(code)


def check_shared_dirs(dirs: dict[str, str | None], wait_s: float = 20.0) -> None:
    """Stop with a clear message unless every rank sees the same folders (the output directory,
    the token cache): rank 0 writes a marker in each, every rank looks for it (waiting up to
    `wait_s` for a network filesystem's caches), and all ranks compare notes. Checkpoints,
    resume and rotation assume one shared output directory; a cache that is not shared would be
    tokenized once per node, or read half-written."""
    if dist.get_world_size() == 1:
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    name = f".argonne-shared-{token[0]}"
    wanted = {what: Path(path) for what, path in dirs.items() if path}
    if dist.get_rank() == 0:
        for path in wanted.values():
            path.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(socket.gethostname())
    dist.barrier()
    deadline = time.monotonic() + wait_s
    unseen = list(wanted)
    while unseen and time.monotonic() < deadline:
        unseen = [what for what in unseen if not (wanted[what] / name).is_file()]
        if unseen:
            time.sleep(0.5)
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), unseen))
    dist.barrier()
    if dist.get_rank() == 0:
        for path in wanted.values():
            (path / name).unlink(missing_ok=True)
    for what, path in wanted.items():
        blind = sorted({host for host, missing in views if what in missing})
        if blind:
            raise ValueError(
                f"{what} {path} is not the same folder on every node: {', '.join(blind)} do not "
                f"see what rank 0 ({views[0][0]}) wrote there; put it on a filesystem all nodes "
                "share (checkpoints, resume and the token cache need one), e.g. an absolute "
                "path on the cluster's shared storage")
