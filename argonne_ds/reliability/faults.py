"""Test hooks that fake the failures a long job meets, so tests can show what the job does.

Every hook is off unless its environment variable is set; none is meant for a real run.

    ARGONNE_INJECT_OOM   where:STEP[xN][@RANK], where one of
                         step      before the step begins, on every rank alike
                         forward   inside the first transformer block's forward this rank holds
                         backward  inside that block's backward
                         e.g. "forward:3@1" (step 3, rank 1 only), "step:2x3" (at step 2 on the
                         first 3 launches). Fires on launches 0..N-1 (ARGONNE_RESTART, which
                         launch/train.sh counts; default N = 1).
    ARGONNE_INJECT_HANG  STEP[@RANK]: that rank sleeps for ever inside the step (first launch).
    ARGONNE_INJECT_LOSS  STEP:FACTOR[,STEP:FACTOR...]: the output head's logits times FACTOR at
                         that step ("nan", "1000"), on every launch (like bad data would).
    ARGONNE_INJECT_SLOW_SAVE  STEP:SECONDS: sleep inside that step's save, after every rank wrote
                         its files and before the checkpoint is published (to kill a job mid-save).
    ARGONNE_INJECT_DISK_FULL  STEP: that step's save fails with ENOSPC after writing part of a file.
    ARGONNE_INJECT_SLOW_WRITE  STEP:SECONDS: a background save of that step sleeps before its first
                         file is written (training goes on meanwhile: to kill a job mid-write).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from argonne_ds.reliability.exits import OutOfMemory

OOM_ENV = "ARGONNE_INJECT_OOM"
HANG_ENV = "ARGONNE_INJECT_HANG"
LOSS_ENV = "ARGONNE_INJECT_LOSS"
DISK_FULL_ENV = "ARGONNE_INJECT_DISK_FULL"
SLOW_WRITE_ENV = "ARGONNE_INJECT_SLOW_WRITE"
_slept: set[str] = set()
SLOW_SAVE_ENV = "ARGONNE_INJECT_SLOW_SAVE"
RESTART_ENV = "ARGONNE_RESTART"


def launch_number() -> int:
    """How many times launch/train.sh relaunched this job before this launch."""
    return int(os.environ.get(RESTART_ENV, "0") or 0)


@dataclass
class _Oom:
    where: str
    step: int
    launches: int
    rank: int | None


def parse_oom(spec: str) -> _Oom | None:
    if not spec:
        return None
    where, _, rest = spec.rpartition(":")
    rest, _, rank = rest.partition("@")
    step, _, times = rest.partition("x")
    if where not in ("step", "forward", "backward"):
        raise ValueError(f"{OOM_ENV}={spec!r}: expected step|forward|backward:STEP[xN][@RANK]")
    return _Oom(where, int(step), int(times or 1), int(rank) if rank else None)


class Faults:
    """The hooks of one rank. The trainer calls `begin(step)` before each step; `install`
    puts the forward/backward and loss hooks on the modules this rank holds."""

    def __init__(self, rank: int) -> None:
        self.rank, self.step = rank, 0
        self.oom = parse_oom(os.environ.get(OOM_ENV, ""))
        if self.oom and (launch_number() >= self.oom.launches
                         or self.oom.rank not in (None, rank)):
            self.oom = None
        at, _, who = os.environ.get(HANG_ENV, "").partition("@")
        self.hang_at = int(at) if at and launch_number() == 0 and who in ("", str(rank)) else 0
        self.loss = {int(s): float(f) for s, _, f in (
            item.partition(":") for item in os.environ.get(LOSS_ENV, "").split(",") if item)}

    def install(self, model: nn.Module) -> None:
        """Hooks on the plain model or on this rank's pipeline stage."""
        from argonne_ds.model.model import ArgonneBlock
        from argonne_ds.model.pipe import HeadPipe

        if self.oom and self.oom.where != "step":
            block = next((m for m in model.modules() if isinstance(m, ArgonneBlock)), None)
            if block is not None:
                block.register_forward_hook(self._block_hook)
        if self.loss:
            for module in model.modules():
                if isinstance(module, HeadPipe) or module is getattr(model, "lm_head", None):
                    module.register_forward_hook(self._loss_hook)

    def begin(self, step: int) -> None:
        self.step = step
        if self.hang_at == step:
            print(f"[faults] rank {self.rank}: hanging in step {step} ({HANG_ENV})", flush=True)
            while True:
                time.sleep(3600)
        if self.oom and self.oom.where == "step" and self.oom.step == step:
            self.oom = None
            raise OutOfMemory(f"CUDA out of memory (injected before step {step})")

    def _fire(self, where: str) -> None:
        self.oom = None
        raise OutOfMemory(f"CUDA out of memory (injected in a block's {where} at step "
                          f"{self.step} on rank {self.rank})")

    # Eager even inside a torch.compile'd block: traced, its step and counters would be guards
    # and every step a recompilation.
    @torch.compiler.disable
    def _block_hook(self, _module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        if not (self.oom and self.oom.step == self.step and torch.is_grad_enabled()):
            return
        if self.oom.where == "forward":
            self._fire("forward")

        def in_backward(grad: torch.Tensor) -> torch.Tensor:
            if self.oom:
                self._fire("backward")
            return grad

        out.register_hook(in_backward)

    def _loss_hook(self, _module: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
        factor = self.loss.get(self.step)
        if factor is None or not torch.is_grad_enabled():
            return out
        return out * factor


def disk_full(step: int, staged: Path) -> None:
    """ARGONNE_INJECT_DISK_FULL=STEP: the save of STEP fails as a full disk does, after part of a
    file is written into its staging folder (every launch: a full disk stays full)."""
    at = os.environ.get(DISK_FULL_ENV, "")
    if at and int(at) == step:
        (staged / "partial.pt").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(staged))


def slow_write(path: str) -> None:
    at, _, seconds = os.environ.get(SLOW_WRITE_ENV, "").partition(":")
    folder = os.path.basename(os.path.dirname(path))
    if at and folder.startswith(f"global_step{at}") and folder[len(f"global_step{at}"):][:1] \
            in ("", ".") and folder not in _slept:
        _slept.add(folder)
        time.sleep(float(seconds or 60))


def slow_save(step: int) -> None:
    at, _, seconds = os.environ.get(SLOW_SAVE_ENV, "").partition(":")
    if at and int(at) == step:
        time.sleep(float(seconds or 60))
