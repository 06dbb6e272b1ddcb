"""argonne-ds: DeepSpeed pretraining for the Argonne 2.0 decoder-only language models.

Imports are lazy so that light commands (`argonne-ds prepare`) start without torch/transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PRESETS", "ArgonneConfig", "load_model_config", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("PRESETS", "ArgonneConfig", "load_model_config"):
        from argonne_ds import config

        return getattr(config, name)
    raise AttributeError(name)
