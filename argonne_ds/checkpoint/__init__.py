"""Checkpoints: `store.py` finds, marks, publishes and rotates them (no DeepSpeed import);
`checkpointer.py` saves and resumes a job; `reshard.py` converts one across layouts (pipeline
<-> ZeRO-3, other stage counts). `from argonne_ds.checkpoint import resolve_checkpoint` and the
other bookkeeping names work as before."""

from argonne_ds.checkpoint.store import (
    CHECKPOINTS,
    MARKER,
    CheckpointError,
    list_tags,
    model_config_of,
    read_marker,
    resolve_checkpoint,
    resume_candidates,
    rotate,
    split_checkpoint_path,
    step_of,
    tag_for,
)

__all__ = ["CHECKPOINTS", "MARKER", "CheckpointError", "list_tags", "model_config_of",
           "read_marker", "resolve_checkpoint", "resume_candidates", "rotate",
           "split_checkpoint_path", "step_of", "tag_for"]
