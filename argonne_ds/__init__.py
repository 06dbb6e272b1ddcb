"""argonne-ds: DeepSpeed pretraining for the Argonne 2.0 decoder-only language models."""

from argonne_ds.config import PRESETS, ArgonneConfig, load_model_config

__version__ = "0.1.0"
__all__ = ["PRESETS", "ArgonneConfig", "load_model_config", "__version__"]
