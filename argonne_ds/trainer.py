"""The training job: resolve the config, build engine and data, resume, loop, checkpoint, stop.

`train(cfg)` reads top to bottom. Optional parts hang off named hooks (`_maybe_log`,
`_maybe_eval`, `_maybe_sample`); reliability parts are explicit: exact resume (weights, optimizer,
LR schedule, step, data position), checkpoints that count only when complete, OOM backoff that
keeps the global batch and the data order, and preemption (SIGTERM/SIGUSR1 -> save -> exit 0).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from argonne_ds import checkpoint as ckpt
from argonne_ds.config import ArgonneConfig, load_model_config
from argonne_ds.data.loader import DataConfig, build_data_iterator
from argonne_ds.data.stream import ResumableShardIterator
from argonne_ds.engine import Batch, ConfigError, Engine, read_ds_config
from argonne_ds.metrics import MetricsSink, flops_per_token, format_duration, peak_tflops

logger = logging.getLogger(__name__)
# Tests: fake an OOM at these steps, e.g. "3" (once at step 3) or "3x3,7" (three tries at 3).
INJECT_OOM_ENV = "ARGONNE_INJECT_OOM_AT_STEP"


@dataclass
class TrainConfig:
    deepspeed_config: str
    data: DataConfig
    model: str = "tiny"
    output_dir: str = "runs/argonne"
    checkpoint_path: str | None = None
    batch_size: int | None = None  # micro-batch per GPU; None: the JSON's
    gradient_accumulation_steps: int | None = None
    learning_rate: float = 3e-4
    min_learning_rate: float = 3e-5
    warmup_steps: int = 2000
    max_steps: int | None = None
    max_tokens: int | None = None  # token budget, alternative to max_steps
    weight_decay: float = 0.1
    precision: str | None = None  # "bf16" | "fp16" | "fp32"; None: the JSON's
    save_interval: int = 1000
    checkpoint_keep: int = 3
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 0
    eval_data_glob: list[str] = field(default_factory=list)
    eval_batches: int = 4
    sample_interval: int = 0
    sample_prompt: str = "The"
    sample_tokens: int = 32
    peak_tflops: float | None = None
    min_micro_batch_size: int = 1
    from_hf: str | None = None  # start from this HF folder's weights (its config is the model)


class OutOfMemory(RuntimeError):
    pass


def is_oom(e: BaseException | None) -> bool:
    """CUDA OOM, or one wrapped by torch.compile/Dynamo (walk the cause chain)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError | OutOfMemory) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


# ---- configuration ------------------------------------------------------------------------------


def resolve_ds_config(cfg: TrainConfig, world_size: int) -> tuple[dict[str, Any], int, list[str]]:
    """The JSON with the CLI's overrides applied; returns (config, max_steps, override notes)."""
    ds = read_ds_config(cfg.deepspeed_config)
    notes: list[str] = []

    def override(path: list[str], value: Any, flag: str) -> None:
        node = ds
        for key in path[:-1]:
            node = node.setdefault(key, {})
        old = node.get(path[-1])
        if old != value:
            notes.append(f"{flag} {value} overrides {'.'.join(path)}={old}")
        node[path[-1]] = value

    if cfg.batch_size:
        override(["train_micro_batch_size_per_gpu"], cfg.batch_size, "--batch-size")
    if cfg.gradient_accumulation_steps:
        override(["gradient_accumulation_steps"], cfg.gradient_accumulation_steps,
                 "--gradient-accumulation-steps")
    stages = int((ds.get("pipeline") or {}).get("stages", 1))
    if world_size % stages:
        raise ConfigError(f"{world_size} processes cannot form {stages} pipeline stages")
    total = ds.pop("train_batch_size", None)  # derived: micro x accumulation x data parallel
    if total and "train_micro_batch_size_per_gpu" not in ds:
        ds["train_micro_batch_size_per_gpu"] = max(
            1, total // (ds.get("gradient_accumulation_steps", 1) * (world_size // stages)))
    global_batch = (ds.get("train_micro_batch_size_per_gpu", 1)
                    * ds.get("gradient_accumulation_steps", 1) * (world_size // stages))
    if cfg.max_steps is None and cfg.max_tokens is None:
        raise ConfigError("give --max-steps or --max-tokens")
    max_steps = cfg.max_steps or math.ceil(cfg.max_tokens / (global_batch * cfg.data.block_size))
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    override(["optimizer", "params", "lr"], cfg.learning_rate, "--learning-rate")
    opt["weight_decay"] = cfg.weight_decay  # applied per group (none on norms, embeddings)
    ratio = cfg.min_learning_rate / cfg.learning_rate
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
        **(ds.get("scheduler") or {}).get("params", {}),
        "total_num_steps": max_steps, "warmup_num_steps": max(1, cfg.warmup_steps),
        "warmup_type": "linear", "warmup_min_ratio": ratio, "cos_min_ratio": ratio}}
    if cfg.precision:
        for kind in ("bf16", "fp16"):
            want = cfg.precision == kind
            if want != bool((ds.get(kind) or {}).get("enabled", False)):
                notes.append(f"--{cfg.precision} {'enables' if want else 'disables'} {kind} "
                             "(the JSON said otherwise)")
            ds.setdefault(kind, {})["enabled"] = want
    return ds, max_steps, notes


# ---- the loop --------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    run_id: str | None = None


class _Recorder:
    """Passes batches through and fingerprints what this rank consumed: crc32 over each sample's
    tokens in order, so two runs compare block for block whatever their micro-batch size."""

    def __init__(self, source: Iterator[Batch]) -> None:
        self.source, self.crc = source, 0

    def __iter__(self) -> _Recorder:
        return self

    def __next__(self) -> Batch:
        x, y = next(self.source)
        for xi, yi in zip(x.numpy(), y.numpy()):
            self.crc = zlib.crc32(yi.tobytes(), zlib.crc32(xi.tobytes(), self.crc))
        return x, y


class _StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signum


def train(cfg: TrainConfig) -> int:
    init_state = None
    if cfg.from_hf:
        from argonne_ds.convert.export import import_hf

        model_config, init_state = import_hf(cfg.from_hf)
    else:
        model_config = load_model_config(cfg.model)
    if cfg.data.block_size > model_config.max_position_embeddings:
        logger.warning("--block-size %d exceeds the model's context; using %d",
                       cfg.data.block_size, model_config.max_position_embeddings)
        cfg.data.block_size = model_config.max_position_embeddings
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config, max_steps, notes = resolve_ds_config(cfg, world)
    engine = Engine(model_config, ds_config, cfg.weight_decay, cfg.seed, init_state)
    rank0 = engine.global_rank == 0
    for note in notes:
        _say(rank0, f"[config] {note}")
    data, tok = build_data_iterator(
        cfg.data, global_batch_size=engine.global_batch_size,
        micro_batch_size=engine.micro_batch_size, dp_rank=engine.dp_rank,
        dp_world=engine.dp_world, model_vocab_size=model_config.vocab_size, show_progress=rank0)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    state = _resume(cfg, engine, data, model_config, ckpt_dir)
    resolved = {"train": asdict(cfg), "deepspeed": ds_config, "model": model_config.to_dict(),
                "max_steps": max_steps, "mode": engine.mode, "world_size": world}
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "resolved_config.json").write_text(json.dumps(resolved, indent=1, default=str))
    sink = MetricsSink(out, state.run_id, resolved, enabled=rank0)
    state.run_id = sink.run_id
    evals = _eval_batches(cfg, engine, model_config, tok.path)
    flops_tok = flops_per_token(model_config, cfg.data.block_size)
    peak = peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       cfg.peak_tflops)
    if cfg.from_hf and state.step == 0:
        state = _carry_import(cfg, engine, data, tok, state, rank0)
    _say(rank0, f"[train] {engine.mode} on {world} ranks (data-parallel {engine.dp_world}), "
         f"global batch {engine.global_batch_size} x {cfg.data.block_size} tokens, steps "
         f"{state.step} -> {max_steps}, output {out}")
    stop = _StopFlag()
    inject = _parse_injection(os.environ.get(INJECT_OOM_ENV, ""))
    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=state.step, disable=None if rank0 else True,
               unit="step", dynamic_ncols=True)
    window_t, window_steps = time.perf_counter(), 0
    while state.step < max_steps:
        before = data.state_dict()
        recorder = _Recorder(data)
        t0 = time.perf_counter()
        engine.begin_step()
        try:
            if inject.get(state.step + 1):
                inject[state.step + 1] -= 1
                raise OutOfMemory(f"CUDA out of memory (injected at step {state.step + 1})")
            result = engine.train_step(recorder)
            oom = False
        except Exception as e:  # noqa: BLE001 - only OOMs are handled; the rest re-raised
            if not is_oom(e):
                raise
            oom = True
        # On the engine's device: NCCL reduces CUDA tensors only.
        flags = torch.tensor([float(oom), float(stop.signal is not None)], device=engine.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank takes the same branch
        if flags[0]:
            _backoff(engine, data, before, cfg, rank0)
            continue
        state.step += 1
        state.tokens += engine.global_batch_size * cfg.data.block_size
        window_steps += 1
        bar.update(1)
        crcs = [None] * engine.world_size
        dist.all_gather_object(crcs, recorder.crc)
        record = {"step": state.step, "loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, "tokens": state.tokens,
                  "samples": data.samples, "epoch": data.epoch,
                  "micro_batch": engine.micro_batch_size, "data_crc": crcs,
                  "step_s": time.perf_counter() - t0}
        sink.log(record)
        if state.step % cfg.log_interval == 0 or state.step == max_steps:
            dt = time.perf_counter() - window_t
            tok_s = window_steps * engine.global_batch_size * cfg.data.block_size / dt
            eta = format_duration((max_steps - state.step) * dt / window_steps)
            mfu = f" | MFU {100 * tok_s * flops_tok / (engine.world_size * peak * 1e12):.1f}%" \
                if peak else ""
            gn = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "-"
            _say(rank0, f"[train] step {state.step}/{max_steps} | loss {result.loss:.4f} | "
                 f"lr {result.lr:.2e} | gnorm {gn} | {tok_s:,.0f} tok/s{mfu} | "
                 f"tokens {state.tokens / 1e6:,.2f}M | data epoch {data.epoch} sample "
                 f"{data.samples:,} | ETA {eta}", bar)
            sink.log({"step": state.step, "event": "throughput", "tok_s": tok_s})
            window_t, window_steps = time.perf_counter(), 0
        _maybe_eval(cfg, engine, evals, state, sink, rank0, bar)
        _maybe_sample(cfg, engine, tok, state, sink, rank0, bar)
        if state.step % cfg.save_interval == 0 or state.step == max_steps or flags[1]:
            _save(engine, ckpt_dir, state, data, cfg, model_config, tok, resolved)
        if flags[1]:
            _say(rank0, f"[train] stop signal received: checkpoint at step {state.step} saved, "
                 "exiting 0; relaunch to resume", bar)
            break
    bar.close()
    sink.close()
    return 0


def _parse_injection(spec: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in filter(None, spec.split(",")):
        step, _, times = item.partition("x")
        out[int(step)] = out.get(int(step), 0) + int(times or 1)
    return out


def _say(rank0: bool, line: str, bar: Any = None) -> None:
    if not rank0:
        return
    if bar is not None and not bar.disable:
        bar.write(line)
    else:
        print(line, flush=True)


def _backoff(engine: Engine, data: ResumableShardIterator, before: dict, cfg: TrainConfig,
             rank0: bool) -> None:
    """Halve the micro-batch, double accumulation: same global batch, same blocks, same model."""
    micro = engine.micro_batch_size
    if micro // 2 < cfg.min_micro_batch_size or micro % 2:
        raise OutOfMemory(f"out of memory at micro-batch {micro}, the floor: the model does not "
                          "fit; add pipeline stages, use ZeRO-3 (offload), or enable activation "
                          "checkpointing")
    engine.set_micro_batch_size(micro // 2)
    data.load_state_dict(before)
    data.set_batch_size(engine.global_batch_size, engine.micro_batch_size)
    _say(rank0, f"[train] out of memory: micro-batch {micro} -> {micro // 2}, gradient "
         f"accumulation {engine.grad_accum}; global batch {engine.global_batch_size} and data "
         "order unchanged; retrying the step")


def _resume(cfg: TrainConfig, engine: Engine, data: ResumableShardIterator,
            model_config: ArgonneConfig, ckpt_dir: Path) -> TrainState:
    directory, tag = (ckpt.split_checkpoint_path(cfg.checkpoint_path) if cfg.checkpoint_path
                      else (ckpt_dir, None))
    candidates = [tag] if tag else ckpt.resume_candidates(directory)
    if cfg.checkpoint_path and not candidates:
        raise ConfigError(f"--checkpoint-path {cfg.checkpoint_path}: no complete checkpoint there")
    for tag in candidates:
        info = _check_compatible(directory / tag, engine, model_config)
        # Keys an older marker lacks (None) are not counted as changes.
        if any(info.get(k) not in (None, v) for k, v in engine.layout().items()):
            return _resume_resharded(directory / tag, info, engine, data, cfg)
        try:
            client, ok = engine.load(directory, tag), 1.0
        except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: fall back to the previous
            logger.warning("could not load checkpoint %s/%s (%s: %s); trying an earlier one",
                           directory, tag, type(e).__name__, e)
            client, ok = {}, 0.0
        agree = torch.tensor([ok], device=engine.device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)  # all ranks resume from the same one
        if not agree[0]:
            continue
        if client.get("micro_batch_size") and client["micro_batch_size"] != (
                engine.micro_batch_size):
            engine.set_micro_batch_size(client["micro_batch_size"])
        data.set_batch_size(engine.global_batch_size, engine.micro_batch_size)
        data.load_state_dict(client["data"], allow_shard_change=cfg.data.allow_shard_change)
        if engine.global_rank == 0:
            print(f"[train] resumed from {directory}/{tag}: step {client['step']}, "
                  f"{client['tokens']:,} tokens, data sample {data.samples:,}", flush=True)
        return TrainState(client["step"], client["tokens"], client.get("wandb_run_id"))
    return TrainState()


def _carry_import(cfg: TrainConfig, engine: Engine, data: ResumableShardIterator, tok: Any,
                  state: TrainState, rank0: bool) -> TrainState:
    """Weights came from an HF folder; an imported original checkpoint also carries its step
    and tokens, so the LR schedule continues where it stopped, and its data position where this
    shard list is the one it read."""
    folder = cfg.from_hf
    meta_path = Path(folder) / "argonne_import.json"
    _say(rank0, f"[train] starting from the weights of {folder}")
    if not meta_path.is_file():
        return state
    meta = json.loads(meta_path.read_text())
    step = int(meta.get("step") or 0)
    engine.set_step(step)
    _say(rank0, f"[train] imported from {meta.get('source')}: step {step}, "
         f"{meta.get('tokens', 0):,} tokens; LR schedule continues at step {step}; optimizer "
         "moments restart (the original's are keyed by parameter index, not name)")
    samples, how = _translate_import_position(meta.get("data_position"), cfg, data, tok)
    if samples is None:
        if rank0:
            logger.warning("data position of the original NOT carried: %s; training starts at "
                           "the first block of the data", how)
    else:
        data.seek(samples)
        _say(rank0, f"[train] data position of the original translated: {how}")
    return TrainState(step, int(meta.get("tokens") or 0), state.run_id)


def _translate_import_position(pos: Any, cfg: TrainConfig, data: ResumableShardIterator,
                               tok: Any) -> tuple[int | None, str]:
    from argonne_ds.convert.original import translate_position
    from argonne_ds.data.discovery import discover_shards
    from argonne_ds.data.tokenizer import make_encoder

    if data.source.mode != "cache":
        return None, "streaming mode (no --cache-dir) cannot seek to it"
    if cfg.data.shuffle_window > 1:
        return None, "--shuffle-window reorders the blocks, so no sample index matches it"
    return translate_position(pos, data.source.index.entries, discover_shards(cfg.data.data_glob),
                              cfg.data.text_column, make_encoder(tok, cfg.data.encoder),
                              cfg.data.block_size, data.source.n_epoch)


def _check_compatible(path: Path, engine: Engine, model_config: ArgonneConfig) -> dict:
    marker = path / ckpt.MARKER
    if not marker.is_file():
        raise ConfigError(f"{path} is not a complete argonne-ds checkpoint (no {ckpt.MARKER})")
    info = json.loads(marker.read_text())
    saved = {k: v for k, v in info.get("model", {}).items() if k in _ARCH_KEYS}
    now = {k: v for k, v in model_config.to_dict().items() if k in _ARCH_KEYS}
    if saved != now:
        diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
        raise ConfigError(f"checkpoint {path} holds a different model ({diff}, saved vs now); "
                          "pass the --model it was trained with, or a new --output-dir")
    return info


def _resume_resharded(path: Path, info: dict, engine: Engine, data: ResumableShardIterator,
                      cfg: TrainConfig) -> TrainState:
    """The checkpoint was written under another layout (pipeline <-> ZeRO-3, other rank counts):
    carry weights, Adam moments, step, LR schedule and data position (reshard.py)."""
    from argonne_ds import reshard

    rank0 = engine.global_rank == 0
    now = engine.layout()
    was = ", ".join(f"{k} {info.get(k)}" for k in now if info.get(k) is not None)
    _say(rank0, f"[train] {path} was written with {was}; this job has "
         f"{', '.join(f'{k} {v}' for k, v in now.items())}: converting it")
    source = reshard.read_source(path, info)
    t0 = time.perf_counter()
    error = reshard.convert_once(source, rank0)
    if error:  # every rank alike
        raise ConfigError(error)
    client = source.client
    bundle = reshard.Bundle(path / reshard.UNIVERSAL, source.mode,
                            engine.model_config.num_hidden_layers)
    adam_step = engine.load_portable(bundle, fallback_step=int(client["global_steps"]))
    took = format_duration(time.perf_counter() - t0)
    engine.set_step(int(client["step"]), samples=client.get("global_samples"))
    data.set_batch_size(engine.global_batch_size, engine.micro_batch_size)
    data.load_state_dict(client["data"], allow_shard_change=cfg.data.allow_shard_change)
    if client["data"].get("global_batch_size") != engine.global_batch_size:
        logger.warning("the global batch changes from %s to %d samples with the new layout; "
                       "data continues at sample %d", client["data"].get("global_batch_size"),
                       engine.global_batch_size, data.samples)
    _say(rank0, f"[train] resumed from {path} across layouts: step {client['step']}, "
         f"{client['tokens']:,} tokens, data sample {data.samples:,}; weights, Adam moments "
         f"(step {adam_step}) and LR schedule carried (converted and loaded in {took})")
    return TrainState(client["step"], client["tokens"], client.get("wandb_run_id"))


_ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings")


def _save(engine: Engine, directory: Path, state: TrainState, data: ResumableShardIterator,
          cfg: TrainConfig, model_config: ArgonneConfig, tok: Any, resolved: dict) -> None:
    tag = ckpt.tag_for(state.step)
    client = {"step": state.step, "tokens": state.tokens, "data": data.state_dict(),
              "model_config": model_config.to_dict(), "tokenizer_fingerprint": tok.fingerprint,
              "tokenizer_path": tok.path, "separator_id": tok.separator_id,
              "wandb_run_id": state.run_id, "resolved_config": copy.deepcopy(resolved),
              "micro_batch_size": engine.micro_batch_size}
    engine.save(directory, tag, client)
    dist.barrier()  # every rank's files are on disk before the marker says "complete"
    if engine.global_rank == 0:
        ckpt.write_marker(directory, tag, {
            "step": state.step, "model": model_config.to_dict(), **engine.layout(),
            "tokenizer_path": os.path.abspath(tok.path),
            "separator_id": tok.separator_id})
        dropped = ckpt.rotate(directory, cfg.checkpoint_keep)
        print(f"[checkpoint] saved {directory}/{tag}" +
              (f" (rotated out {', '.join(dropped)})" if dropped else ""), flush=True)
    dist.barrier()


def _eval_batches(cfg: TrainConfig, engine: Engine, model_config: ArgonneConfig,
                  tokenizer_path: str) -> list[Batch]:
    if not cfg.eval_interval or not cfg.eval_data_glob:
        return []
    eval_cfg = copy.deepcopy(cfg.data)
    eval_cfg.data_glob, eval_cfg.shuffle_window = list(cfg.eval_data_glob), 0
    eval_cfg.tokenizer_path = tokenizer_path  # the training tokenizer, fallback included
    micro = engine.micro_batch_size
    it, _ = build_data_iterator(eval_cfg, global_batch_size=micro * engine.dp_world,
                                micro_batch_size=micro, dp_rank=engine.dp_rank,
                                dp_world=engine.dp_world, model_vocab_size=model_config.vocab_size,
                                show_progress=False)
    return [next(it) for _ in range(cfg.eval_batches)]


def _maybe_eval(cfg: TrainConfig, engine: Engine, evals: list[Batch], state: TrainState,
                sink: MetricsSink, rank0: bool, bar: Any) -> None:
    if not evals or state.step % cfg.eval_interval:
        return
    loss = engine.eval_loss(evals)
    sink.log({"step": state.step, "event": "eval", "eval_loss": loss,
              "eval_ppl": math.exp(min(loss, 50))})
    _say(rank0, f"[eval] step {state.step} | held-out loss {loss:.4f} | perplexity "
         f"{math.exp(min(loss, 50)):,.1f}", bar)


def _maybe_sample(cfg: TrainConfig, engine: Engine, tok: Any, state: TrainState,
                  sink: MetricsSink, rank0: bool, bar: Any) -> None:
    if not cfg.sample_interval or state.step % cfg.sample_interval:
        return
    prompt = tok.backend.encode(cfg.sample_prompt, add_special_tokens=False).ids
    new = engine.generate(prompt, cfg.sample_tokens, stop_id=tok.separator_id)
    text = tok.backend.decode(prompt + new)
    sink.text(state.step, "sample", text)
    _say(rank0, f"[sample] step {state.step}: {text!r}", bar)
