"""`argonne-ds export`: a DeepSpeed checkpoint (pipeline, ZeRO-3 or data parallel, any rank count)
-> a Hugging Face folder that stock `transformers` loads without trust_remote_code; and back.

Weights come out in plain Argonne names first (`full_state`), then through the Llama/Mistral key
map of convert/hf.py. Pipeline checkpoints hold one file per layer (`layer_XX-model_states.pt`,
the module weights the forward used); ZeRO-3 ones are gathered to fp32 by DeepSpeed's
zero_to_fp32; data-parallel ones hold the module in `mp_rank_00_model_states.pt`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from argonne_ds.checkpoint.store import model_config_of, resolve_checkpoint
from argonne_ds.config import ArgonneConfig
from argonne_ds.convert.hf import (
    from_hf_state_dict,
    hf_config,
    hf_to_argonne_key,
    to_hf_state_dict,
)
from argonne_ds.model.pipe import pipe_to_plain_key
from argonne_ds.safe_load import TRUST_HINT, safe_load, verify_folder

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


class ExportError(ValueError):
    """A checkpoint that cannot be exported, phrased for the user."""


def full_state(directory: Path, tag: str, info: dict, trust: bool = False
               ) -> dict[str, torch.Tensor]:
    """The whole model's weights in plain Argonne names, fp32, on CPU. The checkpoint may come
    from elsewhere: its files are checked to load without unpickling code (safe_load.py) before
    DeepSpeed's zero_to_fp32 reads them, unless `trust`."""
    folder = directory / tag
    if not trust:
        verify_folder(folder, hint=TRUST_HINT)
    layers = info["model"]["num_hidden_layers"]
    if info["mode"] == "pipeline":
        state = {}
        for f in sorted(folder.glob("layer_*-model_states.pt")):
            idx = int(f.name.split("_")[1].split("-")[0])
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
                state[pipe_to_plain_key(f"{idx}.{k}", layers)] = v
    elif info["mode"] == "zero3":
        from argonne_ds.engine.state import zero3_fp32_state

        state = zero3_fp32_state(directory, tag)
    else:
        blob = safe_load(folder / "mp_rank_00_model_states.pt", trust=trust,
                         deepspeed_types=True)
        state = dict(blob["module"])
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "bf16",
              max_shard_size: str = "5GB", trust: bool = False) -> Path:
    directory, tag, info = resolve_checkpoint(checkpoint)
    out = write_hf_folder(full_state(directory, tag, info, trust), model_config_of(info), out,
                          dtype=dtype, tokenizer_path=info.get("tokenizer_path"),
                          separator_id=info.get("separator_id"), max_shard_size=max_shard_size)
    (out / "argonne_export.json").write_text(json.dumps(
        {"checkpoint": str(directory / tag), "step": info.get("step"), "dtype": dtype}, indent=1))
    return out


def write_hf_folder(state: dict[str, torch.Tensor], config: ArgonneConfig, out: str | Path,
                    dtype: str = "bf16", tokenizer_path: str | None = None,
                    separator_id: int | None = None, max_shard_size: str = "5GB") -> Path:
    """Plain Argonne weights -> a stock Llama/Mistral folder (+ tokenizer, generation config).

    config.json, generation_config.json and the copied tokenizer all name the separator the
    model was trained with as eos (and no BOS), so that stock tools stop where training's
    documents ended (convert/hf.py, export_special_tokens)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from argonne_ds.convert.hf import export_special_tokens, set_tokenizer_special_tokens

    tok_dir = Path(tokenizer_path) if tokenizer_path and Path(tokenizer_path).is_dir() else None
    try:  # before any weights are written: a wrong tokenizer folder fails fast
        tokens = export_special_tokens(tok_dir, separator_id)
    except ValueError as e:
        raise ExportError(str(e)) from e
    target = hf_config(config, eos_token_id=tokens.eos_id, pad_token_id=tokens.pad_id)
    target.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(target)
    hf_state = to_hf_state_dict(state)
    missing = set(model.state_dict()) - set(hf_state) - {
        k for k in model.state_dict() if "rotary" in k}
    if missing:
        raise ExportError(f"weights missing for {sorted(missing)[:4]}")
    model.load_state_dict(hf_state, strict=False, assign=True)
    model = model.to(target.dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    GenerationConfig(eos_token_id=tokens.eos_id, pad_token_id=tokens.pad_id,
                     bos_token_id=None).save_pretrained(out)
    if tok_dir is not None:
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, out / name)
        set_tokenizer_special_tokens(out, tokens)
        cfg_path = out / "tokenizer_config.json"
        if cfg_path.is_file():
            tc = json.loads(cfg_path.read_text())
            tc["model_max_length"] = config.max_position_embeddings
            cfg_path.write_text(json.dumps(tc, indent=2))
    else:
        logger.warning("no tokenizer folder (%s): %s has no tokenizer files; copy them in",
                       tokenizer_path, out)
    return out


def hf_model_config(folder: str | Path) -> ArgonneConfig:
    """The ArgonneConfig of an exported (or any Llama/Mistral-shaped) HF folder."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if hf.model_type not in ("llama", "mistral"):
        raise ExportError(f"{folder}: model_type {hf.model_type!r} is not Llama/Mistral-shaped")
    if getattr(hf, "sliding_window", None):
        raise ExportError(f"{folder}: sliding-window attention is not Argonne's full attention")
    rope = (getattr(hf, "rope_parameters", None) or {})
    return ArgonneConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
        rope_theta=rope.get("rope_theta", getattr(hf, "rope_theta", 10_000.0)),
        rope_parameters={k: v for k, v in rope.items() if v is not None} or None,
        rms_norm_eps=hf.rms_norm_eps, tie_word_embeddings=hf.tie_word_embeddings)


class LazyState(Mapping[str, torch.Tensor]):
    """Plain Argonne names -> fp32 tensors, each read from the folder's memory-mapped
    safetensors files only when asked for: a pipeline stage reads its own layers, ZeRO-3's rank 0
    one parameter at a time, so no rank holds a second whole copy of the model in host memory."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]  # hf name -> file
        else:
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                files = dict.fromkeys(f.keys(), "model.safetensors")
        self.where = {hf_to_argonne_key(k): (folder / file, k) for k, file in files.items()
                      if "rotary_emb" not in k}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key = self.where[name]
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(key).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def import_hf(folder: str | Path) -> tuple[ArgonneConfig, Mapping[str, torch.Tensor]]:
    """An exported (or any Llama/Mistral-shaped) HF folder -> (ArgonneConfig, plain state).
    Safetensors folders are read lazily (LazyState); others through transformers."""
    folder = Path(folder)
    config = hf_model_config(folder)
    if (folder / "model.safetensors.index.json").is_file() or (
            folder / "model.safetensors").is_file():
        return config, LazyState(folder)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                 dtype=torch.float32)
    return config, from_hf_state_dict(model.state_dict())
