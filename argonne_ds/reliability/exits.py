"""How a job ends: exit codes that tell launch/train.sh whether to relaunch, the one-line job
error, out-of-memory detection, and the stop flag (SIGTERM/SIGUSR1 -> finish the step, save,
exit 0)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from enum import IntEnum


class Exit(IntEnum):
    """`argonne-ds train`'s exit codes; launch/train.sh relaunches after CRASH and RELAUNCH, and
    at once (not counted as a restart) after NEXT_PHASE."""

    OK = 0  # finished, or stopped by a signal after saving
    CRASH = 1  # an unexpected error (its traceback is above)
    BAD_INPUT = 2  # a config, data or checkpoint problem: fix it first
    NO_FIT = 3  # out of memory at the smallest micro-batch
    BAD_STEPS = 4  # too many skipped steps in a row (the bad-step guard)
    DISK_FULL = 5  # the output folder is full, over quota or read-only: free space first
    RELAUNCH = 75  # a hang or an out-of-memory inside a step: relaunching resumes (EX_TEMPFAIL)
    NEXT_PHASE = 76  # saved where a phase changes the context: the next launch builds it


# Called (with a time limit in seconds) just before a rank exits, error or not: the background
# checkpoint writer finishes the files in flight so that a save completes even when the next step
# fails (checkpoint/writer.py registers itself).
EXIT_HOOKS: list[Callable[[float], None]] = []


def run_exit_hooks(timeout_s: float = 120.0) -> None:
    for hook in EXIT_HOOKS:
        with contextlib.suppress(Exception):  # leaving anyway
            hook(timeout_s)


class OutOfMemory(RuntimeError):
    pass


class JobError(RuntimeError):
    """Ends the job with `code` and a one-line message, without a traceback. `everywhere`:
    every rank raises it alike (rank 0 alone prints it)."""

    def __init__(self, message: str, code: Exit, everywhere: bool = False) -> None:
        super().__init__(message)
        self.code, self.everywhere = code, everywhere


def is_oom(e: BaseException | None) -> bool:
    """CUDA OOM, or one wrapped by torch.compile/Dynamo (walk the cause chain)."""
    import torch

    while e is not None:
        if isinstance(e, torch.OutOfMemoryError | OutOfMemory) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False



class StopFlag:
    """Set by SIGTERM or SIGUSR1; the loop checks it (on every rank alike) after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signum
