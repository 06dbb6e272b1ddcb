"""`argonne-ds <command>` on N local ranks, as the deepspeed launcher runs it, without its
processes: each rank is forked from the preloaded forkserver (ranks.rank_context) and runs
`argonne_ds.cli.main(argv)` with the variables the launcher would set, its output in a log file.

For tests whose subject is the job, not the launcher: a launch costs the job's own work instead
of three interpreters importing torch and DeepSpeed (~7 s each on two cores). What the launcher
does that a job relies on is kept: when a rank exits non-zero, the others get SIGTERM, then
SIGKILL after `grace_s`, and the job's code is that rank's (deepspeed/launcher/launch.py).
Tests of the launcher itself (hostfiles, train.sh, ssh) still run the real one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from argonne_ds.testing.ranks import _descendants, cpu_env, free_port, rank_context

# Signalling a rank (or its helper) that has already exited.
_gone = functools.partial(contextlib.suppress, ProcessLookupError, psutil.NoSuchProcess)


def _rank_main(rank: int, world_size: int, port: int, argv: list[str], env: dict[str, str],
               log: str, cwd: str | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if cwd is not None:
        os.chdir(cwd)
    os.environ.clear()  # the job's environment, not the forkserver's
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch

    torch.set_num_threads(1)  # OMP_NUM_THREADS arrives after torch was imported
    code = 1
    try:
        from argonne_ds.cli import main

        code = main(argv)  # distributed: leaves through engine.distributed.shutdown (os._exit)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class LocalJob:
    """A job started by `start_local`: its rank processes, their logs, launcher-like waiting."""

    def __init__(self, procs: list[Any], logs: list[Path], grace_s: float) -> None:
        self.procs, self.logs, self.grace_s = procs, logs, grace_s
        self.pids = [p.pid for p in procs]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The job's code once it is over: the first rank's non-zero code (the others are then
        stopped, as the launcher does), or 0 when every rank exited 0; None while it runs."""
        if self.returncode is not None:
            return self.returncode
        failed = next((p.exitcode for p in self.procs if p.exitcode not in (None, 0)), None)
        if failed is not None:
            self._stop_rest()
            self.returncode = failed  # negative for a signal, as subprocess reports it
        elif all(p.exitcode == 0 for p in self.procs):
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired("argonne-ds (local ranks)", timeout,
                                                output=self.output())
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        """To every rank (a scheduler's preemption signal, or SIGKILL: a node going down)."""
        for p in self.procs:
            if p.exitcode is None:
                with _gone():
                    os.kill(p.pid, sig)

    def kill(self) -> None:
        for proc in [*_descendants(self.pids), *self.procs]:
            with _gone():
                proc.kill()
        for p in self.procs:
            p.join(5)

    def output(self) -> str:
        """Every rank's log, rank 0 first."""
        return "".join(log.read_text(errors="replace") for log in self.logs if log.is_file())

    def _stop_rest(self) -> None:
        alive = [p for p in self.procs if p.exitcode is None]
        for p in alive:
            with _gone():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while any(p.exitcode is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.kill()


def start_local(argv: Sequence[str], log_dir: str | Path, world_size: int = 2,
                env: Mapping[str, str] | None = None, grace_s: float = 30.0,
                cwd: str | Path | None = None) -> LocalJob:
    """Start `argonne-ds argv` on `world_size` local ranks; rank r logs to log_dir/rank{r}.log.
    `env`: the ranks' whole environment (default: this process's), cpu_env() added."""
    ctx = rank_context("forkserver")
    port, log_dir = free_port(), Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"rank{r}.log" for r in range(world_size)]
    for log in logs:
        log.write_text("")
    rank_env = cpu_env({**(os.environ if env is None else env)})
    procs = []
    for rank in range(world_size):
        proc = ctx.Process(target=_rank_main, name=f"argonne-ds-rank{rank}",
                           args=(rank, world_size, port, list(argv), rank_env, str(logs[rank]),
                                 None if cwd is None else str(cwd)))
        proc.start()
        procs.append(proc)
    return LocalJob(procs, logs, grace_s)


def run_local(argv: Sequence[str], log_dir: str | Path, world_size: int = 2,
              env: Mapping[str, str] | None = None, timeout_s: float = 240.0,
              cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run it to the end; the result reads like `subprocess.run`'s with both streams merged."""
    job = start_local(argv, log_dir, world_size, env, cwd=cwd)
    code = job.wait(timeout_s)
    out = job.output()
    return subprocess.CompletedProcess(["argonne-ds", *argv], code, out, out)
