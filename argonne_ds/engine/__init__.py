"""DeepSpeed behind one door: `engine.py` builds and drives the DeepSpeed engine, `state.py`
moves weights and optimizer state in and out of it, `ds_config.py` resolves the JSON (no
DeepSpeed import), `distributed.py` joins and leaves the process group.

`from argonne_ds.engine import Engine` works as before; it is resolved on first use, so that
importing `argonne_ds.engine.ds_config` does not import DeepSpeed."""

from __future__ import annotations

from typing import Any

_LAZY = {"Engine": "engine", "Batch": "engine", "StepResult": "engine", "param_groups": "engine",
         "start_scheduler": "engine", "zero3_fp32_state": "state", "adam_step_value": "state"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"argonne_ds.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'argonne_ds.engine' has no attribute {name!r}")
