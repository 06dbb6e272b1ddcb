"""`argonne-ds import-original`: an original Argonne 2.0 training checkpoint (a torch pickle) ->
a Hugging Face folder plus `argonne_import.json`, from which `argonne-ds train --from-hf` continues
(weights exact, step and LR schedule carried, the data position translated onto this package's
blocks when the shard list is the one the original read: `translate_position`).

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
from argonne_ds.safe_load import UntrustedFileError, safe_load

logger = logging.getLogger(__name__)
GPT2_MARKERS = ("wpe", "position_embedding", "pos_emb", "ln_1", "ln_2", "c_attn", "c_proj",
                "ln_f")


class ImportError_(ValueError):  # noqa: N801 - not the builtin ImportError
    """An original checkpoint that cannot be imported, phrased for the user."""


def read_original(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """The original's checkpoint, read without unpickling code (it holds tensors, numbers,
    strings, lists and dicts); `trust`: unpickle fully (--trust-pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"{path} does not exist")
    try:
        blob = safe_load(path, trust=trust)
    except UntrustedFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is "not a checkpoint"
        raise ImportError_(f"{path} is not a readable torch checkpoint ({e})") from e
    if not isinstance(blob, dict) or "model_state_dict" not in blob:
        raise ImportError_(f"{path}: no 'model_state_dict' key; not an Argonne 2.0 training "
                           "checkpoint")
    return blob


def original_state(blob: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Plain Argonne names, fp32: the compile prefix stripped, Argonne 1.x refused."""
    state = {_plain_key(k): v for k, v in blob["model_state_dict"].items()}
    if any(m in k for k in state for m in GPT2_MARKERS):
        raise ImportError_(
            f"{source} is an Argonne 1.x checkpoint (GPT-2 style: LayerNorm, learned position "
            "embeddings); argonne-ds trains Argonne 2.0 and cannot convert it")
    return {k: v.float() for k, v in state.items()}


def _plain_key(key: str) -> str:
    """Drop the wrappers' name parts: torch.compile's `_orig_mod.`, DDP's `module.`, FSDP's and
    activation checkpointing's (a full state dict saved from inside the wrappers keeps them)."""
    key = key.removeprefix("_orig_mod.").removeprefix("module.")
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        key = key.replace(part, "")
    return key


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
                    dtype: str = "fp32", trust: bool = False) -> Path:
    from argonne_ds.convert.export import write_hf_folder

    blob = read_original(checkpoint, trust)
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


def translate_position(pos: Any, entries: list, shards: list, text_column: str, encoder: Any,
                       block_size: int, n_epoch: int) -> tuple[int | None, str]:
    """The original's data position as a sample index of this cache's blocks: (samples, how) or
    (None, why not).

    The original streamed shards in natural order, document by document (`position_in_file`
    counts rows, blank ones included), cut each document into chunks of `block_size` tokens and
    saved the position of the chunk last trained on (`chunk_offset`: its index in the document;
    its own resume replayed that chunk). Here documents are packed into one stream, each followed
    by the separator, so the tokens it consumed end at: the tokens of the shards before, of the
    rows before, and of chunks 0..chunk_offset of the current document. Training continues at the
    first block that starts there or later: nothing is repeated, and less than one block of the
    current document is passed over. Only in the natural order (--shuffle-window 0) and only
    when the shards it read (`files_processed`) are the first ones of this list.
    """
    from argonne_ds.data.cache import iter_encoded

    if not isinstance(pos, dict) or "current_file_idx" not in pos:
        return None, "the checkpoint holds no data_position"
    if not pos.get("streaming", True):
        return None, ("the original ran in its non-streaming mode (an in-memory shuffle), whose "
                      "order does not map onto these blocks")
    idx, row = int(pos["current_file_idx"]), int(pos.get("position_in_file") or 0)
    chunk = int(pos.get("chunk_offset") or 0)
    names = [e.name for e in entries]
    done = pos.get("files_processed")
    if not isinstance(done, (list, tuple, set)) or not done:
        return None, ("its data_position does not name the shards it read (files_processed), so "
                      "they cannot be matched with this shard list")
    if not 0 <= idx < len(names):
        return None, (f"it was reading shard #{idx + 1}, and this shard list has "
                      f"{len(names)}")
    if names[idx] not in done or set(done) - set(names[:idx + 1]):
        return None, (f"it read {', '.join(sorted(done)[:4])}{' ...' if len(done) > 4 else ''} "
                      f"up to shard #{idx + 1}, which does not match this list's first "
                      f"{idx + 1}: {', '.join(names[:min(idx + 1, 4)])}"
                      f"{' ...' if idx + 1 > 4 else ''}")
    if entries[idx].status != "ok":
        return None, f"its current shard {names[idx]} is skipped here as bad"
    consumed = sum(e.n_tokens for e in entries[:idx] if e.status == "ok")
    doc_len, rows_seen = 0, 0
    for _tokens, lengths, doc_rows, n_rows, _ in iter_encoded(shards[idx], text_column, encoder,
                                                               stop_row=row + 1):
        consumed += int(lengths[doc_rows < row].sum())
        doc_len += int(lengths[doc_rows == row].sum())
        rows_seen += n_rows
    if rows_seen <= row:
        return None, f"{names[idx]} has {rows_seen:,} rows here, the original was at row {row:,}"
    consumed += min((chunk + 1) * block_size, doc_len)
    epoch = int(pos.get("epoch") or 0)
    samples = -(-consumed // block_size) + epoch * n_epoch
    return samples, (f"shard {names[idx]} row {row:,} chunk {chunk} -> token {consumed:,} of "
                     f"the stream -> sample {samples:,}")
