"""The learning rate as a function of the step: cosine or warmup-stable-decay (WSD).

Both warm up linearly from the floor to the peak over `warmup_steps`, as DeepSpeed's
WarmupCosineLR does. Cosine (the default) is DeepSpeed's own scheduler from the JSON; WSD is
`WSDSchedule`, handed to deepspeed.initialize: the peak until the decay starts, then down to the
floor along the decay's shape, the last step of the decay at the floor:

    x = (i - decay_start + 1) / (decay_end - decay_start)          (i: the 0-based step)
    linear: peak - (peak - floor) * x     cosine: floor + (peak - floor) * (1 + cos(pi x)) / 2
    1-sqrt: floor + (peak - floor) * (1 - sqrt(x))                   (MiniCPM, Hägele et al.)

The decay runs over the phase that has `decay:` (from its start to the next phase or the end),
else over the last --decay-steps (or --decay-fraction) of the budget (0: no decay, the peak to
the end: a trunk to branch anneals from). An anneal branch is a decay
phase started from a stable-phase checkpoint: its steps before the branch are the trunk's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from argonne_ds.phases import Plan
from argonne_ds.run_config import ConfigError, RunConfig


@dataclass(frozen=True)
class LRShape:
    peak: float
    floor: float
    warmup: int
    decay_start: int
    decay_end: int
    shape: str = "1-sqrt"

    def __call__(self, i: int) -> float:
        """The learning rate of 0-based step i (the step the log calls i + 1)."""
        peak, floor = self.peak, self.floor
        if i < self.warmup:
            return floor + (peak - floor) * i / self.warmup
        if i < self.decay_start:
            return peak
        if i >= self.decay_end:
            return floor
        x = (i - self.decay_start + 1) / (self.decay_end - self.decay_start)
        if self.shape == "linear":
            return peak - (peak - floor) * x
        if self.shape == "cosine":
            return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * x))
        return floor + (peak - floor) * (1.0 - math.sqrt(x))


def wsd_shape(run: RunConfig, plan: Plan | None, max_steps: int) -> LRShape | None:
    """The WSD shape of this run, or None where DeepSpeed's cosine applies (no decay phase and
    `lr_schedule: cosine`)."""
    t = run.train
    phases = plan.phases if plan else ()
    decays = [i for i, p in enumerate(phases) if p.decay]
    if not decays and t.lr_schedule != "wsd":
        return None
    if len(decays) > 1:
        raise ConfigError(f"phases {phases[decays[0]].name!r} and {phases[decays[1]].name!r} "
                          "both decay the learning rate: one decay phase per run")
    warmup = max(1, t.warmup_steps)
    if decays:
        i = decays[0]
        start = phases[i].start
        end = phases[i + 1].start if i + 1 < len(phases) else max_steps
        shape = phases[i].decay or t.decay_shape
        where = f"phase {phases[i].name!r}"
    else:
        length = t.decay_steps if t.decay_steps is not None else round(t.decay_fraction
                                                                       * max_steps)
        start, end, shape, where = max_steps - length, max_steps, t.decay_shape, "the decay"
    if end < start or (decays and end == start):
        raise ConfigError(f"{where} decays over steps {start}..{end}: it ends before it "
                          f"starts (the budget is {max_steps} steps)")
    return LRShape(t.learning_rate, t.min_learning_rate, warmup, start, end, shape)


class WSDSchedule:
    """A DeepSpeed-style LR scheduler (step / get_lr / state_dict) following an LRShape: what
    DeepSpeed's engine and its checkpoints expect of a client scheduler."""

    def __init__(self, optimizer: Any, shape: LRShape) -> None:
        self.optimizer, self.shape = optimizer, shape
        self.last_batch_iteration = -1

    def get_lr(self) -> list[float]:
        lr = self.shape(max(self.last_batch_iteration, 0))
        return [lr for _ in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = (self.last_batch_iteration + 1 if last_batch_iteration
                                     is None else last_batch_iteration)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Only the position: the shape is this run's (a phase changed before it starts takes
        effect). A cosine checkpoint's state has the same key."""
        self.step(int(state["last_batch_iteration"]))


def start_scheduler(scheduler: Any) -> None:
    """DeepSpeed's WarmupCosineLR begins at iteration -1, where its LR is 0, so the first
    optimizer step would learn nothing; start it at iteration 0, the minimum LR."""
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", None) == -1:
        scheduler.step(0)
