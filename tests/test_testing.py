"""Tests of the distributed test harness itself: real collectives, errors, deaths, hangs.

The worker functions live at module level because spawned ranks unpickle them by reference.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from argonne_ds.testing import DistributedTestError, free_port, run_distributed_test

pytestmark = pytest.mark.distributed


def _all_reduce_rank(rank: int, world_size: int) -> int:
    t = torch.tensor([rank], dtype=torch.int64)
    dist.all_reduce(t)
    assert dist.get_world_size() == world_size
    return int(t.item())


def _boom_on_rank(rank: int, world_size: int, bad_rank: int) -> str:
    if rank == bad_rank:
        raise ValueError(f"boom on rank {rank}")
    return "fine"


def _rank_0_hangs(rank: int, world_size: int) -> str:
    if rank == 0:
        # Stands in for a rank stuck in a collective its peers never join; sleeping does not
        # depend on the process-group timeout, so only the harness's deadline can end it.
        time.sleep(3600)
    return "done"


def _rank_1_exits_without_reporting(rank: int, world_size: int, code: int) -> str:
    if rank == 1:
        os._exit(code)
    return "done"


def _live_workers(before: set[int] | None = None) -> list[psutil.Process]:
    # multiprocessing's resource tracker is a long-lived child of this process by design, and
    # other tests may leave helpers of their own (`before`); only the call's workers (or
    # anything they started) count as leaks.
    children = psutil.Process().children(recursive=True)
    return [c for c in children if "resource_tracker" not in " ".join(_cmdline(c))
            and c.pid not in (before or set()) and c.status() != psutil.STATUS_ZOMBIE]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_all_reduce_across_two_ranks() -> None:
    # Ranks 0 and 1 sum to 1 on every rank: proves the ranks form one real process group.
    assert run_distributed_test(_all_reduce_rank, world_size=2, timeout_s=60) == [1, 1]


def test_error_on_one_rank_is_reported_with_traceback_quickly() -> None:
    timeout_s = 60.0
    before = {p.pid for p in _live_workers()}
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        # kwargs reach fn after (rank, world_size): only the rank named fails.
        run_distributed_test(
            _boom_on_rank, world_size=2, kwargs={"bad_rank": 1}, timeout_s=timeout_s
        )
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "rank 1" in message
    assert "boom on rank 1" in message
    assert "Traceback" in message
    assert "_boom_on_rank" in message
    assert "rank 0 also raised" not in message
    # Rank 0 waits in the final barrier for a peer that will never come; the harness must kill
    # it at once rather than wait for the deadline or the process-group timeout.
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert not _live_workers(before)


@pytest.mark.slow
def test_hung_rank_hits_the_deadline_and_leaves_no_processes() -> None:
    timeout_s = 10.0
    before = {p.pid for p in _live_workers()}
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed_test(_rank_0_hangs, world_size=2, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "did not finish within timeout_s=10 s" in message
    # Rank 1 normally reports first, but on a loaded machine it may not have started yet.
    assert "ranks [0]" in message or "ranks [0, 1]" in message
    assert timeout_s <= elapsed < timeout_s + 5, f"took {elapsed:.1f} s"
    assert not multiprocessing.active_children()
    assert not _live_workers(before)


def test_rank_exiting_without_a_report_names_the_exit_code() -> None:
    before = {p.pid for p in _live_workers()}
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        # args reach fn after (rank, world_size).
        run_distributed_test(_rank_1_exits_without_reporting, world_size=2, args=(3,), timeout_s=60)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "rank 1 died without reporting" in message
    assert "exit code 3" in message
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert not _live_workers(before)


def test_unpicklable_fn_is_rejected_up_front() -> None:
    def local_fn(rank: int, world_size: int) -> int:
        return rank

    with pytest.raises(TypeError, match="module-level function"):
        run_distributed_test(local_fn)
