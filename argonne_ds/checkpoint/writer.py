"""Checkpoint files written in the background: the loop waits only while the state is copied.

`BackgroundWriter` is a DeepSpeed `CheckpointEngine` (the object DeepSpeed hands every file of a
save to: model states, layer files, optimizer partitions). Its `save()` copies the state dict off
the device — into pinned host buffers on a GPU (kept for the next save), a plain copy on a CPU —
and queues it; a thread writes the queued files with torch.save and fsyncs each. The buffers are
kept for the next save (the same files, the same shapes), so that save copies into memory that
is already there. DeepSpeed's
save_checkpoint therefore returns once the copies are made, and training goes on while the files
are written. When a rank's files of a save are written, its writer leaves a marker
(`.written-rank<R>`) in the staging folder (`seal`); rank 0's writer waits for every rank's marker
and then publishes the checkpoint (marker + rename, saver.py) — on its thread, so a save completes
even when the step after it hangs or fails (and a rank that exits waits for its writer first:
reliability/exits.py's EXIT_HOOKS). Until then it is a staging folder that no resume trusts, so a
kill -9 during the write leaves the previous checkpoint the newest; a rank whose write failed
leaves no marker, and nothing is published. One save is in
flight at a time (the next save, a preemption save and the end of the job wait for it), so the
host memory it holds is one copy of this rank's checkpoint.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from argonne_ds.reliability.exits import EXIT_HOOKS
from argonne_ds.reliability.faults import slow_write

IMMUTABLE = (str, bytes, int, float, bool, type(None), torch.dtype, torch.Size, torch.device)


def written_marker(rank: int) -> str:
    return f".written-rank{rank}"


class BackgroundWriter(CheckpointEngine):
    def __init__(self, rank: int = 0, world: int = 1) -> None:
        super().__init__(None)
        self.rank, self.world = rank, world
        self.name = "argonne-background-writer"
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self.error: BaseException | None = None
        self.write_s = 0.0  # seconds the thread spent writing the files of the current save
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()
        EXIT_HOOKS.append(self.drain)

    # ---- DeepSpeed's side -------------------------------------------------------------------
    def create(self, info: Any) -> None:
        self.error, self.write_s = None, 0.0

    def preserves_storage_sharing(self) -> bool:
        return False  # no clone by DeepSpeed: save() copies (compactly) itself

    def save(self, state_dict: Any, path: str) -> None:
        name = os.path.basename(path)
        snapshot = self._copy(state_dict, name, "")
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are complete before the next step writes
        with self._idle:
            self._pending += 1
        self._queue.put((snapshot, path))

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info: Any) -> bool:
        return True  # published by the checkpointer once every rank's files are written

    # ---- the checkpointer's side ------------------------------------------------------------
    def idle(self) -> bool:
        with self._idle:
            return self._pending == 0

    def wait(self) -> None:
        with self._idle:
            while self._pending:
                self._idle.wait()

    def drain(self, timeout_s: float) -> None:
        """Before the process exits: give the files in flight (and rank 0's publish) up to
        `timeout_s` to finish."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def seal(self, staged: Path, publish: Callable[[], None] | None = None) -> None:
        """After the save's files: this rank's marker; with `publish` (rank 0), wait for every
        rank's marker and call it. Both on the thread, after the files queued before."""
        with self._idle:
            self._pending += 1
        self._queue.put((None, (Path(staged), publish)))

    # ---- inside ------------------------------------------------------------------------------
    def _copy(self, obj: Any, name: str, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            # Into this slot's buffer of the previous save (no fresh pages to fault in): pinned
            # host memory for a device tensor, plain memory for a CPU one; compact either way.
            t, slot = obj.detach(), (name, key)
            buf = self._buffers.get(slot)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._buffers[slot] = torch.empty(
                    t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            return buf.copy_(t, non_blocking=t.device.type == "cuda")
        if isinstance(obj, dict):
            return type(obj)((k, self._copy(v, name, f"{key}/{k}")) for k, v in obj.items()) \
                if type(obj) is not dict else {k: self._copy(v, name, f"{key}/{k}")
                                               for k, v in obj.items()}
        if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
            return type(obj)(self._copy(v, name, f"{key}/{i}") for i, v in enumerate(obj))
        if isinstance(obj, IMMUTABLE):
            return obj
        return copy.deepcopy(obj)  # e.g. a loss scaler the next steps update

    def _seal(self, staged: Path, publish: Callable[[], None] | None) -> None:
        if self.error is not None:
            return  # no marker: this save is never published
        with open(staged / written_marker(self.rank), "w") as f:
            os.fsync(f.fileno())
        if publish is None:
            return
        markers = [staged / written_marker(r) for r in range(self.world)]
        while not all(m.exists() for m in markers):
            time.sleep(0.02)  # a rank whose write failed exits, and the job with it
        publish()

    def _run(self) -> None:
        while True:
            snapshot, path = self._queue.get()
            t0 = time.perf_counter()
            try:
                if snapshot is None and isinstance(path, tuple):
                    self._seal(*path)
                    continue
                slow_write(path)
                if self.error is None:
                    with open(path, "wb") as f:
                        torch.save(snapshot, f)
                        f.flush()
                        os.fsync(f.fileno())
            except BaseException as e:  # noqa: BLE001 - kept for the checkpointer to report
                self.error = self.error or e
            finally:
                del snapshot
                self.write_s += time.perf_counter() - t0
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
