"""`argonne-ds import-original`: an original Argonne 2.0 training checkpoint (a torch pickle) ->
a Hugging Face folder plus `argonne_import.json`, from which `argonne-ds train --from-hf` continues
(weights exact, step and LR schedule carried).

The original saved {model_state_dict (maybe with torch.compile's `_orig_mod.` prefix, maybe bf16
with a `model_dtype` key), optimizer_state_dict, scheduler_state_dict {"step"}, global_step,
tokens_processed, batch_size, epoch, loss, data_position {current_file_idx, position_in_file,
chunk_offset, files_processed, ...}}; an FSDP variant adds "format": "fsdp_full_state". Its
parameter names are Argonne 2.0's own (the ones this package uses). Argonne 1.x checkpoints
(GPT-2 style: LayerNorm, learned positions) are recognised and refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from argonne_ds.config import ArgonneConfig, load_model_config

logger = logging.getLogger(__name__)
GPT2_MARKERS = ("wpe", "position_embedding", "pos_emb", "ln_1", "ln_2", "c_attn", "c_proj",
                "ln_f")


class ImportError_(ValueError):  # noqa: N801 - not the builtin ImportError
    """An original checkpoint that cannot be imported, phrased for the user."""


def read_original(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"{path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is "not a checkpoint"
        raise ImportError_(f"{path} is not a readable torch checkpoint ({e})") from e
    if not isinstance(blob, dict) or "model_state_dict" not in blob:
        raise ImportError_(f"{path}: no 'model_state_dict' key; not an Argonne 2.0 training "
                           "checkpoint")
    return blob


def original_state(blob: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Plain Argonne names, fp32: the compile prefix stripped, Argonne 1.x refused."""
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v
             for k, v in blob["model_state_dict"].items()}
    if any(m in k for k in state for m in GPT2_MARKERS):
        raise ImportError_(
            f"{source} is an Argonne 1.x checkpoint (GPT-2 style: LayerNorm, learned position "
            "embeddings); argonne-ds trains Argonne 2.0 and cannot convert it")
    return {k: v.float() for k, v in state.items()}


def check_shapes(state: dict[str, torch.Tensor], config: ArgonneConfig, source: str) -> None:
    from argonne_ds.model.model import ArgonneModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ArgonneModel(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted({*expected} ^ {*got} | {k for k in expected if got.get(k, expected[k])
                                                != expected[k]})
        raise ImportError_(f"{source}: weights do not fit the model config ({wrong[:4]}); pass "
                           "--model with the config it was trained with (default argonne2-orig)")


def import_original(checkpoint: str | Path, out: str | Path, model: str = "argonne2-orig",
                    dtype: str = "fp32") -> Path:
    from argonne_ds.convert.export import write_hf_folder

    blob = read_original(checkpoint)
    state = original_state(blob, str(checkpoint))
    config = load_model_config(model)
    check_shapes(state, config, str(checkpoint))
    out = write_hf_folder(state, config, out, dtype=dtype, tokenizer_path=None,
                          separator_id=None)
    step = int(blob.get("global_step") or (blob.get("scheduler_state_dict") or {}).get("step", 0))
    meta = {
        "source": str(checkpoint), "format": blob.get("format", "plain"), "step": step,
        "tokens": int(blob.get("tokens_processed") or 0), "epoch": blob.get("epoch"),
        "loss": blob.get("loss"), "data_position": blob.get("data_position"),
        "model_dtype": str(blob.get("model_dtype", "float32")),
        "optimizer_moments": "not carried",
    }
    (Path(out) / "argonne_import.json").write_text(json.dumps(meta, indent=1, default=str))
    if blob.get("optimizer_state_dict"):
        logger.warning("the original optimizer state is not carried (its moments are keyed by "
                       "parameter index in the original's order); AdamW restarts its moments "
                       "at step %d", step)
    return out
