"""Text generation with the plain model: batched left-padded prompts, a KV cache, greedy or
temperature / top-k / top-p sampling, stopping at EOS. Restores train mode if it found it on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from argonne_ds.model.model import ArgonneModel


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    greedy: bool = False
    seed: int = 0


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (B, V) with everything outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate_ids(model: ArgonneModel, prompts: list[list[int]], sampling: SamplingConfig,
                 stop_ids: set[int], pad_id: int) -> list[list[int]]:
    """New tokens for each prompt (without the prompt), EOS included when reached."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the same column
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    cache: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    step_ids = ids
    limit = model.config.max_position_embeddings
    if model.config.rope_type == "dynamic":  # NTK-aware scaling reads past the context
        limit = width + sampling.max_new_tokens
    for _ in range(min(sampling.max_new_tokens, limit - width)):
        logits = model(step_ids, cache=cache, attention_mask=mask).logits[:, -1].float()
        if sampling.greedy or sampling.temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = _filter_logits(logits / sampling.temperature, sampling.top_k,
                                   sampling.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
        done |= torch.tensor([t in stop_ids for t in nxt.tolist()], device=device)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if was_training:
        model.train()
    return out


def stop_and_pad(tok: Any) -> tuple[set[int], int]:
    """The tokenizer's eos/separator ids, and the id left padding uses."""
    stop = {t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>"))
            if isinstance(t, int) and t >= 0 and t != tok.unk_token_id}
    return stop, tok.pad_token_id if tok.pad_token_id is not None else next(iter(stop), 0)


def generate_text(model: ArgonneModel, tok: Any, prompts: list[str] | list[list[int]],
                  sampling: SamplingConfig, batch_size: int = 8) -> list[str]:
    """Continuations of `prompts` (texts, or token ids), batch by batch; stops at the
    tokenizer's eos/separator."""
    stop, pad = stop_and_pad(tok)
    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        encoded = [p if isinstance(p, list) else tok(p, add_special_tokens=False)["input_ids"]
                   or [pad] for p in chunk]
        for new in generate_ids(model, encoded, sampling, stop, pad):
            texts.append(tok.decode([t for t in new if t not in stop]))
    return texts


def placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where inference runs: "auto" is the GPU when there is one, in bf16 when it supports it
    (fp32 elsewhere: CPUs are slow in bf16 and eval figures stay comparable)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if device == "auto" else device)
    if dtype == "auto":
        half = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if half else torch.float32
    return dev, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def load_for_generation(model_path: str | None = None, checkpoint: str | None = None,
                        device: str = "auto", dtype: str = "auto") -> tuple[ArgonneModel, Any]:
    """An HF folder (exported or Llama/Mistral-shaped) or an argonne-ds checkpoint -> (model on
    `device` in `dtype` (see `placement`), transformers tokenizer)."""
    from transformers import AutoTokenizer

    from argonne_ds.checkpoint.store import model_config_of, resolve_checkpoint
    from argonne_ds.convert.export import full_state, import_hf

    if model_path:
        config, state = import_hf(model_path)
        tok_dir = model_path
    elif checkpoint:
        directory, tag, info = resolve_checkpoint(checkpoint)
        config = model_config_of(info)
        state = full_state(directory, tag, info)
        tok_dir = info.get("tokenizer_path")
        if not tok_dir or not Path(tok_dir).is_dir():
            raise FileNotFoundError(f"checkpoint {directory / tag}: its tokenizer folder "
                                    f"{tok_dir} is gone; export it or pass --model-path")
    else:
        raise ValueError("give --model-path (a Hugging Face folder) or --checkpoint")
    model = ArgonneModel(config)
    model.load_state_dict(state)
    dev, dt = placement(device, dtype)
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return model.to(device=dev, dtype=dt).eval(), tok
