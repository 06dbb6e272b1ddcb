"""The bad-step guard: a step whose loss or gradient norm is not finite, or far above the
recent ones, is skipped — its data is consumed and the step counts (the LR schedule moves on),
but weights and optimizer state stay as they were.

"Far above" is OLMo-core's rule: more than `sigma` standard deviations above the mean of the
last `window` steps (6 and 128 by default), judged once half the window is there. Every step's
finite values enter the window, skipped ones too, so a lasting shift of the loss (new data) is
learnt after a step or two instead of skipping for ever. The engine calls `verdict` inside the
optimizer step with the step's global loss and gradient norm (the same numbers on every rank, so
every rank decides alike); the trainer calls `settle` after every step to count skips and stop
the job after `max_in_a_row` in a row.

Why stop rather than roll back by itself: a run that skips step after step is not recovering,
and whether the cause is the data (skip it: `--skip-steps`) or the model (resume an earlier
checkpoint with a lower learning rate) is a person's call; an automatic rollback that meets the
same data again would loop.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

from argonne_ds.reliability.exits import Exit, JobError


def parse_steps(items: list[str]) -> set[int]:
    """`["1201-1250", "1307"]` -> the steps."""
    out: set[int] = set()
    for item in items:
        for part in filter(None, str(item).replace(",", " ").split()):
            first, _, last = part.partition("-")
            try:
                a, b = int(first), int(last or first)
            except ValueError:
                raise ValueError(f"--skip-steps: {part!r} is not a step or a range A-B") from None
            if a < 1 or b < a:
                raise ValueError(f"--skip-steps: {part!r} is not a step or a range A-B (A <= B)")
            out.update(range(a, b + 1))
    return out


class BadStepGuard:
    def __init__(self, sigma: float = 6.0, window: int = 128, max_in_a_row: int = 8,
                 skip_steps: set[int] | None = None) -> None:
        self.sigma, self.max_in_a_row = sigma, max_in_a_row
        self.skip_steps = skip_steps or set()
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.skipped, self.in_a_row, self.first_in_a_row = 0, 0, 0
        self.last_reason = ""

    def verdict(self, step: int, loss: float, norm: float | None) -> str | None:
        """Why step `step` must not update the weights, or None."""
        reason = None
        if step in self.skip_steps:
            reason = "listed in --skip-steps"
        elif not math.isfinite(loss):
            reason = f"loss {loss}"
        elif norm is not None and not (math.isfinite(norm) and norm >= 0):
            reason = f"gradient norm {norm}"
        else:
            reason = (self._outlier("loss", loss, self.losses) or
                      (self._outlier("gradient norm", norm, self.norms) if norm is not None
                       else None))
        if math.isfinite(loss):
            self.losses.append(loss)
        if norm is not None and math.isfinite(norm) and norm >= 0:
            self.norms.append(norm)
        return reason

    def _outlier(self, what: str, value: float, history: deque[float]) -> str | None:
        if not self.sigma or len(history) < max(2, (history.maxlen or 2) // 2):
            return None
        mean, std = statistics.fmean(history), statistics.pstdev(history)
        if value - mean > self.sigma * std:
            z = (value - mean) / std if std else math.inf
            return (f"{what} {value:.4g} is {z:.1f} standard deviations above the mean of the "
                    f"last {len(history)} steps ({mean:.4g} +- {std:.2g}; limit {self.sigma:g})")
        return None

    def settle(self, step: int, skipped: str | None) -> str | None:
        """Count the step; a line for the log when it was skipped."""
        if not skipped:
            self.in_a_row = 0
            return None
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.first_in_a_row = step
        self.last_reason = skipped
        return (f"[guard] step {step} skipped: {skipped}; weights unchanged, its data consumed "
                f"({self.in_a_row} in a row, {self.skipped} in all; the job stops at "
                f"{self.max_in_a_row} in a row)")

    def stop_if_stuck(self, step: int, newest_checkpoint: Callable[[], str | None]) -> None:
        """After `max_in_a_row` skips in a row (steps not listed in --skip-steps): JobError,
        exit 4, with the way out."""
        if self.in_a_row < self.max_in_a_row or step in self.skip_steps:
            return
        since = self.first_in_a_row
        raise JobError(
            f"{self.in_a_row} steps in a row skipped ({since}-{step}; the last: "
            f"{self.last_reason}): the run is not recovering by itself, so it stops here "
            f"without saving. The newest checkpoint is {newest_checkpoint() or 'none'}. "
            "Relaunching as is replays the same data; to train past it, relaunch with "
            f"--skip-steps {since}-{step + 50} (that data is consumed without training on it), "
            "or resume an earlier checkpoint (--checkpoint-path) with a lower --learning-rate",
            Exit.BAD_STEPS, everywhere=True)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms),
                "skipped": self.skipped, "in_a_row": self.in_a_row,
                "first_in_a_row": self.first_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(state.get("losses", []))
        self.norms.clear()
        self.norms.extend(state.get("norms", []))
        self.skipped = int(state.get("skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))
        self.first_in_a_row = int(state.get("first_in_a_row", 0))
