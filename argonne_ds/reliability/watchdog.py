"""Hangs: a step, save or evaluation that does not finish in time ends the rank with every
thread's stack and the exit code that relaunches the job."""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque

from argonne_ds.reliability.exits import Exit, run_exit_hooks


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
        run_exit_hooks(60.0)  # a checkpoint being written in the background completes first
        os._exit(Exit.RELAUNCH)
