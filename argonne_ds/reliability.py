"""What keeps a long job alive: out-of-memory detection (and a test hook that fakes one), and the
stop flag that turns SIGTERM/SIGUSR1 into "finish the step, save, exit 0"."""

from __future__ import annotations

import os
import signal
import time

import torch

# Test hook, off by default: fake an OOM at these steps, e.g. "3" (once at step 3) or "3x3,7"
# (three tries at step 3, then once at 7).
INJECT_OOM_ENV = "ARGONNE_INJECT_OOM_AT_STEP"


# Test hook, off by default: "STEP:SECONDS" sleeps SECONDS inside the save of step STEP, after
# every rank wrote its files and before the checkpoint is published (to kill a job mid-save).
SLOW_SAVE_ENV = "ARGONNE_INJECT_SLOW_SAVE"


def slow_save_hook(step: int) -> None:
    at, _, seconds = os.environ.get(SLOW_SAVE_ENV, "").partition(":")
    if at and int(at) == step:
        time.sleep(float(seconds or 60))


class OutOfMemory(RuntimeError):
    pass


def is_oom(e: BaseException | None) -> bool:
    """CUDA OOM, or one wrapped by torch.compile/Dynamo (walk the cause chain)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError | OutOfMemory) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def parse_injection(spec: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in filter(None, spec.split(",")):
        step, _, times = item.partition("x")
        out[int(step)] = out.get(int(step), 0) + int(times or 1)
    return out


class StopFlag:
    """Set by SIGTERM or SIGUSR1; the loop checks it (on every rank alike) after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signum
