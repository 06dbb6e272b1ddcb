"""Checkpoint bookkeeping around DeepSpeed's own save/load: which checkpoints are complete, which
one to resume, rotation. No DeepSpeed import here.

A DeepSpeed checkpoint is a folder `<dir>/global_step<N>/` written by every rank. It is written
as `global_step<N>.partial/`; once every rank's files are on disk (a barrier), rank 0 writes the
marker `argonne_complete.json` into it and renames it to `global_step<N>` (`publish`). So a
`global_step<N>` folder is complete the moment it exists, a job killed mid-save leaves only a
`.partial` folder that resume ignores and the next save or rotation removes, and saving over an
existing tag (after a rollback) never shows a half-written folder under its name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
MARKER = "argonne_complete.json"
TAG_RE = re.compile(r"global_step(\d+)")
STAGING = ".partial"  # a save in progress: global_step<N>.partial
REPLACED = ".replaced"  # the previous global_step<N> while a save over it is being published
LEFTOVER_RE = re.compile(r"global_step\d+(\.partial|\.replaced)")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.fullmatch(tag)
    return int(m.group(1)) if m else None


def write_marker(directory: Path, tag: str, info: dict[str, Any], folder: str | None = None
                 ) -> None:
    """The completion marker of checkpoint `tag`, in `folder` (default: the tag's own)."""
    path = Path(directory) / (folder or tag) / MARKER
    tmp = path.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps({**info, "tag": tag, "time": time.time()}, indent=1))
    os.replace(tmp, path)


def staging_tag(tag: str) -> str:
    return tag + STAGING


def publish(directory: Path, tag: str, info: dict[str, Any]) -> None:
    """Mark the staged save of `tag` complete and make it visible under its name: a rename,
    replacing an older checkpoint of the same tag (which is moved aside first, then deleted)."""
    directory = Path(directory)
    write_marker(directory, tag, info, folder=staging_tag(tag))
    final, old = directory / tag, directory / (tag + REPLACED)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(directory / staging_tag(tag), final)
    shutil.rmtree(old, ignore_errors=True)


def set_aside(directory: Path, tags: list[str]) -> Path:
    """Move checkpoints out of the resume candidates (a branch abandoned by a rollback), kept in
    `abandoned-<time>/` rather than deleted."""
    aside = Path(directory) / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for tag in tags:
        os.replace(Path(directory) / tag, aside / tag)
    return aside


def list_tags(directory: Path) -> tuple[list[str], list[str]]:
    """(complete, incomplete) checkpoint tags under `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return [], []
    tags = sorted((p.name for p in directory.iterdir()
                   if p.is_dir() and step_of(p.name) is not None), key=lambda t: step_of(t) or 0)
    complete = [t for t in tags if (directory / t / MARKER).is_file()]
    return complete, [t for t in tags if t not in complete]


def resume_candidates(directory: Path) -> list[str]:
    """Complete tags, newest first (the caller falls back down the list if a load fails)."""
    complete, incomplete = list_tags(directory)
    newest_complete = step_of(complete[-1]) if complete else -1
    for tag in incomplete:
        if (step_of(tag) or 0) > newest_complete:
            logger.warning("checkpoint %s/%s is incomplete (no %s): a save was interrupted; "
                           "resuming from an earlier one", directory, tag, MARKER)
    return list(reversed(complete))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, phrased for the user (the CLI prints one line)."""


CHECKPOINTS = "checkpoints"  # the folder inside a run's --output-dir


def split_checkpoint_path(path: str | Path) -> tuple[Path, str | None]:
    """A checkpoint argument may name a run directory (train's --output-dir), its checkpoints
    folder (-> the newest complete tag) or one global_stepN folder."""
    path = Path(path)
    if step_of(path.name) is not None:
        return path.parent, path.name
    if (path / CHECKPOINTS).is_dir() and not list_tags(path)[0] + list_tags(path)[1]:
        return path / CHECKPOINTS, None
    return path, None


def read_marker(folder: Path) -> dict[str, Any]:
    """The completion marker of one checkpoint folder; a clear error when it is not one."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{folder} is not a complete argonne-ds checkpoint (no {MARKER}): "
                              "a save was interrupted, or this is not a checkpoint; use a "
                              "finished one")
    return json.loads(marker.read_text())


def resolve_checkpoint(path: str | Path) -> tuple[Path, str, dict[str, Any]]:
    """A run directory, checkpoints folder (its newest complete tag) or global_stepN folder ->
    (checkpoints folder, tag, marker)."""
    directory, tag = split_checkpoint_path(path)
    if tag is None:
        complete = resume_candidates(directory)
        if not complete:
            raise CheckpointError(f"{path}: no complete argonne-ds checkpoint there (a "
                                  f"global_stepN folder with {MARKER}); give a run's "
                                  "--output-dir, its checkpoints/ folder or one global_stepN")
        tag = complete[0]
    return directory, tag, read_marker(directory / tag)


def model_config_of(info: dict[str, Any]) -> Any:
    """The ArgonneConfig a checkpoint's marker records."""
    from argonne_ds.config import ArgonneConfig

    return ArgonneConfig(**{k: v for k, v in info["model"].items()
                            if k not in ("model_type", "architectures", "transformers_version")})


def rotate(directory: Path, keep: int) -> list[str]:
    """Keep the newest `keep` complete checkpoints; drop older ones and stale partial saves."""
    if keep <= 0:
        return []
    complete, incomplete = list_tags(directory)
    newest = step_of(complete[-1]) if complete else -1
    doomed = complete[:-keep] + [t for t in incomplete if (step_of(t) or 0) < newest]
    doomed += [p.name for p in Path(directory).iterdir() if LEFTOVER_RE.fullmatch(p.name)]
    for tag in doomed:
        shutil.rmtree(Path(directory) / tag, ignore_errors=True)
    return doomed


def resume_step_of(output_dir: str | Path, checkpoint_path: str | None) -> int | None:
    """The step of the checkpoint a launch will resume, as far as the names tell (None: none):
    the run's own newest first, as Checkpointer.resume chooses; it may fall back to an older
    one when the newest will not load (extension.Launch.check_resumed)."""
    out = Path(output_dir) / CHECKPOINTS
    own = resume_candidates(out)
    if checkpoint_path:
        directory, tag = split_checkpoint_path(checkpoint_path)
        if tag and Path(directory).resolve() == out.resolve():
            return step_of(tag) or 0
        if not own:
            found = [tag] if tag else resume_candidates(Path(directory))
            return (step_of(found[0]) or 0) if found else 0
    return (step_of(own[0]) or 0) if own else None
