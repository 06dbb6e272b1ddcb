"""What keeps a long job alive: exit codes that tell launch/train.sh whether to relaunch, the
out-of-memory backoff record a relaunch starts from, the stop flag (SIGTERM/SIGUSR1 -> finish
the step, save, exit 0) and the hang watchdog."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from enum import IntEnum
from pathlib import Path
from typing import Any


class Exit(IntEnum):
    """`argonne-ds train`'s exit codes; launch/train.sh relaunches after CRASH and RELAUNCH."""

    OK = 0  # finished, or stopped by a signal after saving
    CRASH = 1  # an unexpected error (its traceback is above)
    BAD_INPUT = 2  # a config, data or checkpoint problem: fix it first
    NO_FIT = 3  # out of memory at the smallest micro-batch
    BAD_STEPS = 4  # too many skipped steps in a row (the bad-step guard)
    RELAUNCH = 75  # a hang or an out-of-memory inside a step: relaunching resumes (EX_TEMPFAIL)


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


# ---- out of memory: the job exits, the relaunch starts with half the micro-batch ---------------

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
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{rank}")
    tmp.write_text(json.dumps({"micro_batch_size": micro, "was": was, "step": step,
                               "rank": rank, "error": error[:300], "time": time.time()}))
    os.replace(tmp, path)
    return path


# ---- signals ------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM or SIGUSR1; the loop checks it (on every rank alike) after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signum


# ---- hangs --------------------------------------------------------------------------------------


class Watchdog:
    """Ends a rank whose step does not finish in time: prints why and every thread's Python
    stack to stderr, then exits RELAUNCH (75), which makes the launcher stop the other ranks and
    launch/train.sh relaunch the job (resuming from the last checkpoint).

    Every rank runs one, so in a hang (one rank stuck, the others waiting for it in a
    collective) each rank's stack reaches the log. The limit is `--step-timeout` when given,
    else 10x the median of the last 50 steps (at least 5 min), and 30 min until 5 steps are
    timed (start-up, compilation). Saves, evaluations and samples get at least 30 min. A
    thread of Python's faulthandler backs it up (exit 1, 60 s later) in case the stuck call
    never releases the interpreter lock."""

    WARMUP_STEPS, FACTOR, FLOOR_S, STARTUP_S, BACKUP_S = 5, 10.0, 300.0, 1800.0, 60.0

    def __init__(self, rank: int, timeout: float | None) -> None:
        self.rank, self.timeout = rank, timeout
        self.times: deque[float] = deque(maxlen=50)
        self._deadline: float | None = None
        self._what, self._limit = "", 0.0
        self._cond = threading.Condition()
        if timeout != 0:
            threading.Thread(target=self._watch, name="argonne-watchdog", daemon=True).start()

    def limit(self) -> float:
        if self.timeout:
            return self.timeout
        if len(self.times) < self.WARMUP_STEPS:
            return self.STARTUP_S
        return max(self.FLOOR_S, self.FACTOR * statistics.median(self.times))

    def arm(self, what: str, long: bool = False) -> None:
        """Start timing `what` (a step; `long`: a save, evaluation or sample)."""
        if self.timeout == 0:
            return
        limit = max(self.limit(), self.STARTUP_S) if long else self.limit()
        with self._cond:
            self._what, self._limit = what, limit
            self._deadline = time.monotonic() + limit
            self._cond.notify()
        faulthandler.dump_traceback_later(limit + self.BACKUP_S, exit=True)

    def disarm(self, step_seconds: float | None = None) -> None:
        if step_seconds is not None:
            self.times.append(step_seconds)
        if self.timeout == 0:
            return
        faulthandler.cancel_dump_traceback_later()
        with self._cond:
            self._deadline = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                elif time.monotonic() < self._deadline:
                    self._cond.wait(self._deadline - time.monotonic())
                else:
                    self._fire()

    def _fire(self) -> None:
        if len(self.times) >= self.WARMUP_STEPS and not self.timeout:
            how = f"{self.FACTOR:g}x the median step of {statistics.median(self.times):.1f} s"
        else:
            how = "--step-timeout" if self.timeout else "the start-up allowance"
        head = (f"[watchdog] rank {self.rank}: {self._what} has not finished after "
                f"{round(self._limit, 1):g} s "
                f"({how}); its threads' stacks follow, then exit "
                f"{int(Exit.RELAUNCH)} so that the job stops and launch/train.sh relaunches it")
        with tempfile.TemporaryFile("w+") as f:  # one write per rank: ranks share the log
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            stacks = "".join(f"[rank {self.rank}] {line}" for line in f)
        sys.stdout.flush()
        os.write(sys.stderr.fileno(), f"{head}\n{stacks}".encode())
        os._exit(Exit.RELAUNCH)
