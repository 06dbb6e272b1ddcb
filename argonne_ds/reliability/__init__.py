"""Keeping a long job alive: exit codes and the stop flag (exits), the out-of-memory relaunch
record (backoff), the hang watchdog (watchdog), the bad-step guard (guard) and the fault hooks
the tests inject failures with (faults). Standard library only at import: the CLI reads the
exit codes before torch is imported."""

from argonne_ds.reliability.backoff import BACKOFF_FILE, read_backoff, write_backoff
from argonne_ds.reliability.exits import Exit, JobError, OutOfMemory, StopFlag, is_oom
from argonne_ds.reliability.watchdog import Watchdog

__all__ = ["BACKOFF_FILE", "Exit", "JobError", "OutOfMemory", "StopFlag", "Watchdog", "is_oom",
           "read_backoff", "write_backoff"]
