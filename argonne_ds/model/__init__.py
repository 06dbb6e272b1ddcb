"""The Argonne 2.0 model: plain PyTorch (`model.py`) and its DeepSpeed pipeline form (`pipe.py`)."""

from argonne_ds.model.model import ArgonneModel, causal_lm_loss, count_parameters

__all__ = ["ArgonneModel", "causal_lm_loss", "count_parameters"]
