"""Resume a checkpoint under another layout: pipeline (N stages) <-> ZeRO-3 (M ranks) <-> data
parallel, any rank counts.

DeepSpeed's native checkpoints are layout-bound: a pipeline stage's ZeRO-1 optimizer file holds
flat partitions of that stage's parameters, a ZeRO-3 file a slice of every parameter. The route:

1. Read: DeepSpeed's own `ds_to_universal` turns the source checkpoint (pipeline with ZeRO >= 1,
   or ZeRO-1/2/3) into one folder per parameter (`fp32`, `exp_avg`, `exp_avg_sq`, maybe `step`),
   in the source module's parameter names. It runs once, on rank 0, into `<tag>/universal/`
   (reused by a later resume; removed with the checkpoint by rotation).
2. Name: pipeline names (`3.attn.q_proj.weight`) and plain names (`blocks.2.attn.q_proj.weight`)
   are mapped through the plain model's names.
3. Write: each rank builds its engine normally and sets its own parameters' fp32 masters and Adam
   moments (Engine.load_portable), then the step, LR schedule and data position from the
   source's client state.

A pipeline checkpoint under ZeRO stage 0 has no optimizer partitions for step 1 to read: it is
refused with a message (the ds_configs/ pipeline configs use ZeRO-1 for this reason).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from argonne_ds.model.pipe import pipe_to_plain_key, plain_to_pipe_key
from argonne_ds.safe_load import safe_load

logger = logging.getLogger(__name__)
UNIVERSAL = "universal"
DONE = "argonne_universal.json"
FAILED = "universal.error"
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


class ReshardError(ValueError):
    """A checkpoint that cannot be carried over to this layout (the message says why and what to
    do)."""


@dataclass
class Source:
    """A checkpoint as written: its layout and its client state (step, tokens, data position)."""

    path: Path
    mode: str
    world_size: int
    client: dict[str, Any]
    stamp: Any = None  # the marker's time: which save a universal/ folder was converted from


def read_source(path: Path, info: dict[str, Any]) -> Source:
    """The checkpoint's client state, from its rank-0 model-states file (every layout has one)."""
    files = sorted(path.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise ReshardError(f"{path}: no *mp_rank_00_model_states.pt; not a DeepSpeed checkpoint")
    # mmap: a data-parallel checkpoint holds the whole model here; only the small keys are read.
    blob = safe_load(files[0], mmap=True, deepspeed_types=True)
    client = {k: v for k, v in blob.items() if k not in ("module", "optimizer")}
    return Source(path, str(info.get("mode")), int(info.get("world_size") or 0), client,
                  info.get("time"))


def converted(source: Source) -> bool:
    """Whether `<source>/universal` is a finished conversion of this very save (a checkpoint
    saved again under the same tag keeps no stale conversion)."""
    done = source.path / UNIVERSAL / DONE
    try:
        return json.loads(done.read_text()).get("source_stamp") == source.stamp
    except (OSError, ValueError):
        return False


def convert_once(source: Source, rank0: bool, timeout_s: float = 3 * 3600) -> str | None:
    """Rank 0 converts; the others wait for its result on the filesystem rather than in a
    collective (a large model's conversion outlasts the process group's timeout). Returns the
    error message, the same on every rank, or None."""
    failed = source.path / FAILED
    if rank0:
        failed.unlink(missing_ok=True)
        try:
            to_universal(source, timeout_s)
        except ReshardError as e:
            failed.write_text(str(e))
    deadline = time.monotonic() + timeout_s + 60
    while not rank0 and not converted(source) and not failed.is_file():
        if time.monotonic() > deadline:
            return f"{source.path}: rank 0 did not finish converting it in {timeout_s:.0f} s"
        time.sleep(1.0)
    return failed.read_text() if failed.is_file() else None


def to_universal(source: Source, timeout_s: float = 3 * 3600) -> Path:
    """Convert the source checkpoint with DeepSpeed's ds_to_universal, once: reused when an
    earlier resume already converted it."""
    out = source.path / UNIVERSAL
    if converted(source):
        return out
    if not list(source.path.glob("*optim_states.pt")):
        raise ReshardError(
            f"{source.path} was written by {source.mode} with ZeRO stage 0, which saves no "
            "optimizer partitions DeepSpeed can read per parameter, so it cannot resume under "
            "another layout; resume it with the DeepSpeed config it was written with (use ZeRO "
            "stage >= 1 in the config of runs that should move between layouts), or start "
            "from its weights only: argonne-ds export, then train --from-hf")
    shutil.rmtree(out, ignore_errors=True)  # a conversion interrupted earlier
    tmp = source.path / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, (os.cpu_count() or 1) // 2)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(source.path), "--output_folder", str(tmp),
           "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]
    logger.info("converting %s to per-parameter form for the new layout (ds_to_universal)",
                source.path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not (tmp / "zero").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ReshardError(f"DeepSpeed's ds_to_universal could not convert {source.path} "
                           f"(exit {proc.returncode}):\n{tail}")
    (tmp / DONE).write_text(json.dumps({"source_mode": source.mode,
                                        "source_world_size": source.world_size,
                                        "source_stamp": source.stamp}))
    os.replace(tmp, out)
    return out


class Bundle:
    """Per-parameter state of a universal folder, addressed by plain-model names."""

    def __init__(self, folder: Path, source_mode: str, num_layers: int) -> None:
        self.zero = folder / "zero"
        self.num_layers = num_layers
        self.pipe_names = source_mode == "pipeline"
        names = sorted(p.name for p in self.zero.iterdir() if p.is_dir())
        self.names = {self._plain(n): n for n in names}
        # mmap: from a ZeRO-3 source it also holds rank 0's flat partitions; only the step is read.
        common = safe_load(self.zero / "optimizer_state.pt", mmap=True, deepspeed_types=True)
        state = (common.get("optimizer_state_dict") or {}).get("state") or {}
        first = next(iter(state.values()), {})
        self._common_step = first.get("step") if isinstance(first, dict) else None

    def _plain(self, name: str) -> str:
        return pipe_to_plain_key(name, self.num_layers) if self.pipe_names else name

    def source_name(self, plain: str) -> str:
        return plain_to_pipe_key(plain, self.num_layers) if self.pipe_names else plain

    def check_names(self, wanted: set[str]) -> None:
        missing, extra = wanted - set(self.names), set(self.names) - wanted
        if missing or extra:
            raise ReshardError(f"the checkpoint's parameters do not match this model: missing "
                               f"{sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}")

    def tensor(self, plain: str, key: str, shape: torch.Size) -> torch.Tensor:
        # mmap: the ranks of a node share the page cache instead of a copy each.
        blob = safe_load(self.zero / self.names[plain] / f"{key}.pt", mmap=True,
                         deepspeed_types=True)
        t = blob["param"] if isinstance(blob, dict) else blob
        if t.numel() != shape.numel():
            raise ReshardError(f"{plain}: {key} has {t.numel()} values in the checkpoint, the "
                               f"model's parameter {tuple(shape)}")
        return t.reshape(shape).float()

    def adam_step(self, plain: str, fallback: int) -> int:
        path = self.zero / self.names[plain] / "step.pt"
        if path.is_file():
            return int(safe_load(path, deepspeed_types=True))
        if self._common_step is not None:
            return int(self._common_step)
        return fallback

    def states(self, plain: str, shape: torch.Size) -> Iterator[tuple[str, torch.Tensor]]:
        for key in STATE_KEYS:
            yield key, self.tensor(plain, key, shape)
