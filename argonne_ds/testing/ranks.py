"""Helpers for testing distributed code on CPU: spawn gloo ranks, collect results, never hang.

``run_distributed_test(fn, world_size=2)`` runs ``fn(rank, world_size, *args, **kwargs)`` in
``world_size`` fresh processes that form a real process group through
``deepspeed.init_distributed`` (gloo on CPU), and returns what each rank returned, ordered by
rank. A rank that raises, dies or hangs turns into a ``DistributedTestError`` naming the rank and
carrying its traceback; the parent enforces an overall deadline, so a missed collective costs a
test ``timeout_s`` seconds, not the 30 minutes of the default process-group timeout.

``fn`` and everything in ``args``/``kwargs`` must be picklable: define ``fn`` at module level. A
test module's functions qualify when pytest imports it (its default "prepend" import mode puts
``tests/`` on ``sys.path``, and spawned children receive the parent's ``sys.path``).

The choices below follow measurements on 2-core CPU machines (see the project notes on running
DeepSpeed on CPU): one thread per rank, no JIT build of the shm op, and a barrier → destroy →
flush → ``os._exit`` shutdown, without which about one 2-rank gloo run in three aborted at exit.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

import torch
import torch.multiprocessing as torch_mp

from argonne_ds.engine.distributed import free_port, shutdown, skip_shm_build

T = TypeVar("T")

# The process-group timeout turns a missed collective inside a rank into an exception (with a
# traceback) instead of a 30-minute wait. It is capped because the parent's deadline already
# bounds the whole test; a longer process-group timeout would only hide the traceback.
_MAX_PG_TIMEOUT_S = 60.0
# How long terminated workers get to exit before they are SIGKILLed, and how long the parent
# waits for the exit code of a worker whose pipe closed (the two events are not simultaneous).
_KILL_GRACE_S = 3.0
_EXITCODE_GRACE_S = 5.0


# What every rank imports (torch, DeepSpeed, transformers, the trainer): ~5 s per process on two
# cores. Under "forkserver" (the default) one server process imports them once per test session
# and every rank is forked from it, so a 2-rank test starts in well under a second.
PRELOAD = ("torch", "deepspeed", "argonne_ds.cli", "argonne_ds.trainer")


def rank_context(start_method: str = "forkserver") -> Any:
    """The multiprocessing context ranks start from; a forkserver preloads `PRELOAD` (the
    preload list only counts before the server's first start, so it is set every time)."""
    ctx = torch_mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


class DistributedTestError(AssertionError):
    """A rank failed, died or did not finish in time.

    An ``AssertionError`` so that pytest reports it as a test failure and shows the message
    (which holds the worker's own traceback) rather than an internal error.
    """


def cpu_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables for running DeepSpeed ranks on a small CPU machine.

    Returned as a dict so the same settings serve spawned workers and launcher subprocesses
    (``subprocess.run(..., env={**os.environ, **cpu_env()})``).
    """
    env = {
        # Explicit accelerator: skips DeepSpeed's probing and its "Setting accelerator to CPU"
        # warning, and keeps a machine with a GPU from silently testing something else.
        "DS_ACCELERATOR": "cpu",
        # Two ranks with the default thread count on two cores made tiny steps ~100x slower
        # (oversubscription); nothing launches ranks with one thread unless told to.
        "OMP_NUM_THREADS": "1",
    }
    if extra:
        env.update(extra)
    return env


def run_distributed_test(
    fn: Callable[..., T],
    world_size: int = 2,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    start_method: str = "forkserver",
    env: Mapping[str, str] | None = None,
) -> list[T]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return the results.

    Raises ``DistributedTestError`` as soon as any rank raises or dies without reporting, or when
    ``timeout_s`` (counted from the first spawn, so it includes start-up, ~3-4 s per run on two
    cores) passes before every rank has reported and exited. All workers are dead when this
    function returns or raises.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    _check_picklable(fn)

    ctx = rank_context(start_method)
    # A fresh port per call: consecutive tests must not meet a previous run's store.
    port = free_port()
    worker_env = cpu_env(env)
    deadline = time.monotonic() + timeout_s
    procs: list[Any] = []
    readers: list[Connection] = []
    try:
        for rank in range(world_size):
            # One pipe per rank rather than a shared queue: the parent can wait on pipes and
            # process sentinels together (a death is seen at once, no polling), a closed pipe
            # means "died without reporting", and a Connection send is synchronous, so nothing
            # is lost in a feeder thread when the worker leaves through os._exit.
            reader, writer = ctx.Pipe(duplex=False)
            # Not a daemon: daemonic processes may not start children (DataLoader workers);
            # the finally block below is what guarantees the workers die.
            proc = ctx.Process(
                target=_worker,
                args=(
                    fn,
                    rank,
                    world_size,
                    port,
                    tuple(args),
                    dict(kwargs or {}),
                    backend,
                    timeout_s,
                    worker_env,
                    writer,
                ),
                name=f"distributed-test-rank{rank}",
            )
            proc.start()
            # Drop the parent's copy of the write end, or the reader never sees EOF when the
            # worker dies.
            writer.close()
            procs.append(proc)
            readers.append(reader)
        results = _collect(procs, readers, deadline, timeout_s)
        _await_clean_exit(procs, deadline, timeout_s)
        return results
    finally:
        _kill_all(procs)
        for reader in readers:
            reader.close()


def _check_picklable(fn: Callable[..., Any]) -> None:
    # Spawn pickles ``fn`` by reference; a lambda or a function defined inside a test would fail
    # in Process.start with a message that does not say what to do.
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            f"run_distributed_test needs a picklable fn (a module-level function), got {fn!r}: "
            f"{exc}"
        ) from exc


def _collect(
    procs: list[Any], readers: list[Connection], deadline: float, timeout_s: float
) -> list[Any]:
    """Wait for every rank's report; raise on the first error, death or the deadline."""
    results: dict[int, Any] = {}
    pending = set(range(len(procs)))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DistributedTestError(_timeout_message(sorted(pending), procs, timeout_s))
        sentinels = {procs[r].sentinel: r for r in pending}
        waitables: list[Any] = [readers[r] for r in pending] + list(sentinels)
        ready = wait(waitables, timeout=remaining)
        ready_ranks = sorted(
            {r for r in pending if readers[r] in ready}
            | {sentinels[s] for s in ready if s in sentinels}
        )
        for rank in ready_ranks:
            # A worker always writes before it exits, and a write larger than the pipe buffer
            # blocks until read, so a dead worker's report (if any) is still in the pipe.
            report = _read_report(readers[rank])
            if report is None:
                raise DistributedTestError(_died_message(rank, procs[rank]))
            status, payload = report
            if status == "error":
                raise DistributedTestError(_error_message(rank, payload, procs, readers))
            results[rank] = payload
            pending.discard(rank)
    return [results[r] for r in range(len(procs))]


def _read_report(reader: Connection) -> tuple[str, Any] | None:
    """Return ``(status, payload)``, or None when the worker closed its pipe without writing."""
    if not reader.poll(0):
        return None
    try:
        raw = reader.recv_bytes()
    except (EOFError, OSError):
        # EOFError: closed with nothing written; OSError: killed in the middle of a write.
        return None
    rank, status, payload = pickle.loads(raw)
    del rank  # the pipe already says which rank this is
    return status, payload


def _await_clean_exit(procs: list[Any], deadline: float, timeout_s: float) -> None:
    """After all ranks reported success, require each to exit with code 0 before the deadline.

    A rank that returned a result but then aborted at exit (gloo's "terminate called without an
    active exception") is a shutdown bug worth failing on, not noise to hide.
    """
    # At least a short grace, so a rank that reported just before the deadline can still get
    # through its barrier and exit; the wait stays bounded either way.
    exit_deadline = max(deadline, time.monotonic() + _EXITCODE_GRACE_S)
    for proc in procs:
        proc.join(max(0.0, exit_deadline - time.monotonic()))
    stuck = [rank for rank, proc in enumerate(procs) if proc.exitcode is None]
    if stuck:
        raise DistributedTestError(
            f"ranks {stuck} returned results but did not exit within timeout_s={timeout_s:g} s "
            "(stuck in the final barrier or destroy_process_group?)"
        )
    failed = [(rank, proc.exitcode) for rank, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        described = ", ".join(f"rank {rank}: {_describe_exitcode(code)}" for rank, code in failed)
        raise DistributedTestError(f"ranks returned results but exited uncleanly ({described})")


def _timeout_message(pending: list[int], procs: list[Any], timeout_s: float) -> str:
    finished = [r for r in range(len(procs)) if r not in pending]
    return (
        f"ranks {pending} did not finish within timeout_s={timeout_s:g} s "
        f"(ranks {finished} reported); a rank is hung, most likely in a collective that another "
        "rank never joined. All workers were killed."
    )


def _died_message(rank: int, proc: Any) -> str:
    # The pipe can close a moment before the process is reaped; give the exit code time to
    # appear so the message can name it.
    proc.join(_EXITCODE_GRACE_S)
    hint = ""
    if proc.exitcode == 1:
        # Exit code 1 with no report is what multiprocessing's bootstrap returns when the child
        # cannot even unpickle its target; the worker itself reports every exception it sees.
        hint = (
            " Exit code 1 without a report usually means the worker failed before running fn,"
            " e.g. fn's module cannot be imported in a fresh process (pytest"
            " --import-mode=importlib, or fn defined in an interactive __main__)."
        )
    return (
        f"rank {rank} died without reporting a result ({_describe_exitcode(proc.exitcode)}); "
        f"see the captured stderr for its output. All workers were killed.{hint}"
    )


def _error_message(rank: int, tb: str, procs: list[Any], readers: list[Connection]) -> str:
    message = f"rank {rank} raised an exception:\n\n{tb}"
    # Other ranks often fail at the same moment (a peer's error closes the connections their
    # collective waits on); include reports that have already arrived, without waiting, since
    # the first one is usually the cause and the rest its echoes.
    for other in range(len(procs)):
        if other == rank:
            continue
        report = _read_report(readers[other])
        if report is not None and report[0] == "error":
            message += f"\nrank {other} also raised:\n\n{report[1]}"
    return message


def _describe_exitcode(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"exit code {code}, killed by {name}"
    return f"exit code {code}"


def _kill_all(procs: list[Any]) -> None:
    """Terminate, then kill, every worker and its descendants; reap them all."""
    descendants = _descendants([p.pid for p in procs if p.is_alive()])
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    grace_end = time.monotonic() + _KILL_GRACE_S
    for proc in procs:
        proc.join(max(0.0, grace_end - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    # A killed worker cannot clean up its own children (e.g. DataLoader workers); they would be
    # reparented to init and outlive the test.
    for child in descendants:
        with contextlib.suppress(Exception):
            child.kill()


def _descendants(pids: list[int]) -> list[Any]:
    try:
        import psutil  # a DeepSpeed dependency; optional here
    except ImportError:
        return []
    found: list[Any] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.extend(psutil.Process(pid).children(recursive=True))
    return found


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    backend: str,
    timeout_s: float,
    env: dict[str, str],
    writer: Connection,
) -> None:
    """Body of one rank: set up, run ``fn``, report, shut down, ``os._exit``."""
    # The variables the DeepSpeed launcher / torchrun would set. Without them init_distributed
    # falls back to MPI discovery and fails on mpi4py.
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    # OMP_NUM_THREADS arrives after torch was imported (unpickling this function imports the
    # module); set_num_threads is what actually sizes the intra-op pool.
    torch.set_num_threads(1)

    ok = False
    initialized = False
    try:
        import deepspeed

        skip_shm_build()
        deepspeed.init_distributed(
            dist_backend=backend,
            timeout=timedelta(seconds=min(timeout_s, _MAX_PG_TIMEOUT_S)),
        )
        initialized = True
        result = fn(rank, world_size, *args, **kwargs)
        # Plain pickle, not the multiprocessing pickler: torch's reducers would send tensors as
        # shared-memory handles that the parent can only open while this process is alive, and
        # this process is about to os._exit. Plain pickle copies the data.
        message = pickle.dumps((rank, "ok", result))
        ok = True
    except BaseException:  # report everything, SystemExit and KeyboardInterrupt included
        message = pickle.dumps((rank, "error", traceback.format_exc()))

    try:
        writer.send_bytes(message)
    except Exception:  # the parent is gone (killed or timed out): nobody to report to
        ok = False

    try:
        if initialized:
            # Barrier (only after success: after an error the peers may never arrive, and the
            # parent kills everyone anyway), destroy the group, flush, os._exit.
            shutdown(0 if ok else 1, clean=ok)
    finally:
        # os._exit skips atexit handlers and interpreter teardown (where gloo's threads abort)
        # and also Python's own flush of the standard streams, so flush them here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)
