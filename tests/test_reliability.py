"""The pieces of reliability.py on their own: the watchdog's limit and what it does when a step
overruns it, and the out-of-memory backoff record."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from argonne_ds.reliability import Exit, Watchdog, read_backoff, write_backoff


def test_the_watchdog_limit_follows_the_median_step() -> None:
    dog = Watchdog(rank=0, timeout=0)  # 0: off (no thread), the limit rule still answers
    assert Watchdog(rank=0, timeout=42).limit() == 42
    dog.timeout = None
    assert dog.limit() == Watchdog.STARTUP_S  # until 5 steps are timed
    for seconds in (1.0, 1.2, 0.9, 50.0, 1.1):  # one slow step does not move the median much
        dog.disarm(seconds)
    assert dog.limit() == Watchdog.FLOOR_S  # 10 x 1.1 s, but at least 300 s
    for _ in range(50):
        dog.disarm(60.0)
    assert dog.limit() == 600.0


def test_an_overrun_prints_the_stacks_and_exits_75(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import time
        from argonne_ds.reliability import Watchdog

        def stuck_in_a_collective():
            time.sleep(30)

        dog = Watchdog(rank=3, timeout=0.5)
        dog.arm("step 7")
        stuck_in_a_collective()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == Exit.RELAUNCH
    assert "[watchdog] rank 3: step 7 has not finished after 0.5 s (--step-timeout)" in proc.stderr
    assert any(line.startswith("[rank 3] ") and "stuck_in_a_collective" in line
               for line in proc.stderr.splitlines())


def test_a_disarmed_watchdog_stays_quiet() -> None:
    script = textwrap.dedent("""
        import time
        from argonne_ds.reliability import Watchdog

        dog = Watchdog(rank=0, timeout=0.5)
        for _ in range(3):
            dog.arm("a step")
            time.sleep(0.3)
            dog.disarm(0.3)
        time.sleep(1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "[watchdog]" not in proc.stderr


def test_the_backoff_record(tmp_path: Path) -> None:
    assert read_backoff(tmp_path) is None
    write_backoff(tmp_path, micro=2, was=4, step=3, rank=1, error="CUDA out of memory")
    assert read_backoff(tmp_path)["micro_batch_size"] == 2
    (tmp_path / "oom_backoff.json").write_text("{half")
    with pytest.raises(ValueError, match="oom_backoff.json is unreadable"):
        read_backoff(tmp_path)
