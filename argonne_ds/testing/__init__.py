"""Helpers for testing distributed code on CPU, shipped with the package.

`ranks.run_distributed_test(fn, world_size=2)` runs a function on N gloo ranks and returns what
each returned; `launch.run_local(argv)` / `start_local` run an `argonne-ds` command on N local
ranks the way the deepspeed launcher does, without its processes; `memory.measured_step_peak`
measures a step's peak for the memory plan's tests."""

from argonne_ds.engine.distributed import skip_shm_build
from argonne_ds.testing.launch import LocalJob, run_local, start_local
from argonne_ds.testing.memory import measured_step_peak
from argonne_ds.testing.ranks import (
    DistributedTestError,
    cpu_env,
    free_port,
    rank_context,
    run_distributed_test,
)

__all__ = ["DistributedTestError", "LocalJob", "cpu_env", "free_port", "measured_step_peak",
           "rank_context", "run_distributed_test", "run_local", "skip_shm_build", "start_local"]
