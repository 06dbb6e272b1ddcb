"""Saving a training run: synchronous, or with the files written in the background.

`Saving` is the save half of the Checkpointer (checkpointer.py holds the resume half). A save
writes into `global_stepN.partial` and publishes it (marker + rename, store.py) only once every
rank's files are on disk, so a save cut at any point leaves the previous checkpoint the newest.

With `checkpoint.async_save` the loop is blocked only while DeepSpeed's state is copied off the
device (writer.py); the files are written by a thread while training goes on, and rank 0's thread
publishes once every rank's marker says its files are on disk — no collective, so the save
completes even if the next step fails. After every step `poll()` reports a finished save (and a
failed write, as below). The next save, a save on a stop signal and the end of the job wait for a
write in flight first (`finish()`), and those two final saves are written at once.
Disk space is checked at the start and before each save (space.py); a save that fails because
the disk is full, over quota or read-only ends the job with one line and exit DISK_FULL.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argonne_ds.checkpoint import space
from argonne_ds.checkpoint import store as ckpt
from argonne_ds.reliability.exits import Exit, JobError
from argonne_ds.reliability.faults import disk_full, slow_save

logger = logging.getLogger(__name__)
# What deepspeed's launch.py (and Slurm's default KillWait) gives ranks between SIGTERM and SIGKILL.
SIGTERM_GRACE_S = 30


@dataclass
class InFlight:
    """A save whose files are being written in the background."""

    tag: str
    step: int
    staged: Path
    started: float  # perf_counter at the start of the save
    blocked_s: float  # how long the loop waited (the copy off the device)
    published: tuple[float, int, list[str]] | None = None  # rank 0: (seconds, bytes, rotated)
    waited: bool = False  # written while the loop waited (synchronous, or a final save)


class Saving:
    # Set by the Checkpointer: run, engine, data, tok, resolved, directory, rank0, branch.
    save_bytes: int | None = None  # the last save's size (rank 0), for the space check
    _warned_slow = False
    _writer: Any = None
    _in_flight: InFlight | None = None
    _unsettled = False  # a background save since the last finish(): the same on every rank
    sink: Any = None  # the MetricsSink: a `checkpoint` event per published save

    def newest(self) -> str | None:
        """The newest complete checkpoint of this run, for messages."""
        complete = ckpt.list_tags(self.directory)[0]
        return str(self.directory / complete[-1]) if complete else None

    # ---- disk space ---------------------------------------------------------------------------
    def _needed(self) -> int:
        if self.save_bytes is None:
            newest = self.newest()
            ds = self.engine.ds_config
            half = any((ds.get(k) or {}).get("enabled") for k in ("bf16", "fp16"))
            self.save_bytes = (space.folder_bytes(newest) if newest else
                               space.estimate_save_bytes(self.engine.model_config, half))
        return self.save_bytes

    def check_space(self, at_start: bool) -> None:
        """Rank 0 compares the free space in the output folder with a save's size (the last
        one's, else an estimate) and warns when fewer than two saves fit. At the start of a job,
        when not even one fits, every rank alike stops (DISK_FULL) before training steps that
        could not be saved (a relaunch after a failed save ends here, losing nothing)."""
        verdict = None
        if self.rank0:
            needed, free = self._needed(), space.free_bytes(self.directory)
            if free < needed and at_start:
                verdict = (f"{self.directory} has {space.gb(free)} free and a checkpoint needs "
                           f"~{space.gb(needed)}: not starting steps that could not be saved "
                           f"(the newest intact checkpoint is {self.newest() or 'none'}); free "
                           "space or give another --output-dir, then relaunch")
            elif free < 2 * needed:
                logger.warning("%s has %s free: %s checkpoint of ~%s fit%s (the previous one "
                               "stays until the next is complete)", self.directory,
                               space.gb(free), "fewer than two" if free >= needed else "no",
                               space.gb(needed), "" if free >= needed else "s: the next save "
                               "will likely fail")
        if at_start:
            verdict = self.engine.broadcast_object(verdict)
        if verdict:
            raise JobError(verdict, Exit.DISK_FULL, everywhere=True)

    def _save_failed(self, error: BaseException, step: int, staged: Path) -> None:
        """A save that failed: re-raised as it is, unless the disk is why (full, quota,
        read-only): then one line, the partial save removed, exit DISK_FULL (not relaunched)."""
        needed = self.save_bytes or self._needed()
        problem = space.disk_problem(error, self.directory, needed)
        if problem is None:
            raise error
        shutil.rmtree(staged, ignore_errors=True)
        free = space.free_bytes(self.directory)
        raise JobError(
            f"the checkpoint of step {step} could not be written: {self.directory} is {problem} "
            f"({space.gb(free)} free after removing the partial save, a save needs "
            f"~{space.gb(needed)}); the newest intact checkpoint is {self.newest() or 'none'}. "
            "Free space or give another --output-dir (the run's folder moved there), then "
            "relaunch: it resumes from that checkpoint", Exit.DISK_FULL) from None

    # ---- save ---------------------------------------------------------------------------------
    def save(self, state: Any, final: bool = False) -> None:
        """Save at state.step; in the background (async_save) unless `final` (the end of the
        job, a stop signal): those are written before this returns."""
        self.finish()  # one save in flight at a time
        self.check_space(at_start=False)
        tag = ckpt.tag_for(state.step)
        client = {"step": state.step, "tokens": state.tokens, "data": self.data.state_dict(),
                  "model_config": self.engine.model_config.to_dict(),
                  "tokenizer_fingerprint": self.tok.fingerprint,
                  "tokenizer_path": self.tok.path, "separator_id": self.tok.separator_id,
                  "wandb_run_id": state.run_id, "resolved_config": copy.deepcopy(self.resolved),
                  "guard": state.guard, "branch": self.branch}
        staged = self.directory / ckpt.staging_tag(tag)
        if self.rank0:  # a save of this tag interrupted earlier
            shutil.rmtree(staged, ignore_errors=True)
        self.engine.barrier()
        t0 = time.perf_counter()
        background = self.run.checkpoint.async_save
        if background and self._writer is None:
            from argonne_ds.checkpoint.writer import BackgroundWriter

            self._writer = BackgroundWriter(self.engine.global_rank, self.engine.world_size)
        try:
            self.engine.save(self.directory, staged.name, client,
                             writer=self._writer if background else None)
            disk_full(state.step, staged)
        except Exception as e:  # noqa: BLE001 - re-raised unless the disk is full
            self._save_failed(e, state.step, staged)
        job = self._in_flight = InFlight(tag, state.step, staged, t0, time.perf_counter() - t0,
                                         waited=final or not background)
        if not background:
            slow_save(state.step)
            self.engine.barrier()  # every rank's files are on disk before it is published
            if self.rank0:
                try:
                    self._publish_files(job)
                except OSError as e:
                    self._save_failed(e, state.step, staged)
            self._done()
            self.engine.barrier()
            return
        self._writer.seal(staged, (lambda: self._publish_files(job)) if self.rank0 else None)
        self._unsettled = True
        if final:
            self.finish()
        elif self.rank0:
            print(f"[checkpoint] step {state.step}: state copied in {job.blocked_s:.2f} s; "
                  f"writing {staged.name} in the background", flush=True)

    def poll(self) -> None:
        """After a step: report the save in flight once this rank's writer is done with it."""
        if self._in_flight is not None and self._writer is not None and self._writer.idle():
            self._done()

    def finish(self) -> None:
        """Wait for the save in flight, if any (every rank alike: the next save, the end)."""
        if not self._unsettled:
            return
        self._writer.wait()
        if self._in_flight is not None:
            self._done()
        self.engine.barrier()  # every rank is past the save before the next one starts
        self._unsettled = False

    def _done(self) -> None:
        """This rank's part of the save is over: a failed write ends the job here (one line;
        DISK_FULL when the disk is why), rank 0 reports the published checkpoint."""
        job, self._in_flight = self._in_flight, None
        error = self._writer.error if self._writer is not None else None
        if error is not None:
            self._save_failed(error, job.step, job.staged)
        if self.rank0 and job.published is not None:
            self._report(job)

    def _publish_files(self, job: InFlight) -> None:
        """Rank 0, once every rank's files are on disk (on the writer's thread when async)."""
        if self._writer is not None and self.run.checkpoint.async_save:
            slow_save(job.step)
            for marker in job.staged.glob(".written-rank*"):  # their work is done
                marker.unlink()
        ckpt.publish(self.directory, job.tag, {
            "step": job.step, "model": self.engine.model_config.to_dict(),
            **self.engine.layout(), "run": self.run.to_dict(),
            "tokenizer_path": os.path.abspath(self.tok.path),
            "separator_id": self.tok.separator_id, "branch": self.branch})
        dropped = ckpt.rotate(self.directory, self.run.checkpoint.checkpoint_keep)
        size = space.folder_bytes(self.directory / job.tag)
        job.published = (time.perf_counter() - job.started, size, dropped)

    def _report(self, job: InFlight) -> None:
        took, size, dropped = job.published
        self.save_bytes = size
        how = (f"in {took:.1f} s" if job.waited or took <= job.blocked_s + 0.05 else
               f"in {took:.1f} s (the loop waited {job.blocked_s:.2f} s of it)")
        print(f"[checkpoint] saved {self.directory}/{job.tag} {how} ({size / 1e9:.2f} GB)"
              + (f", rotated out {', '.join(dropped)}" if dropped else ""), flush=True)
        if self.sink is not None:
            self.sink.log({"step": job.step, "event": "checkpoint", "save_s": took,
                           "blocked_s": took if job.waited else job.blocked_s, "bytes": size})
        if took > SIGTERM_GRACE_S and not self._warned_slow:
            self._warned_slow = True
            logger.warning(
                "a save takes %.0f s, more than the %d s a scheduler or the deepspeed launcher "
                "leaves between SIGTERM and SIGKILL: a save on their SIGTERM would be cut (the "
                "previous checkpoint stays the newest). Stop the job with SIGTERM or SIGUSR1 to "
                "launch/train.sh (it waits for the save), or ask Slurm for SIGUSR1 earlier "
                "(--signal=B:USR1@N in launch/slurm.sbatch, N above the save time)",
                took, SIGTERM_GRACE_S)
