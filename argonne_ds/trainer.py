"""The training loop: one global batch per step, until the budget is spent or a signal stops it.

`setup` builds what the loop works with (engine, data, checkpointer, metrics) from a RunConfig;
`train` reads top to bottom. What the loop does besides stepping hangs off named hooks
(`ProgressLog`, `HeldOutEval`, `Sample`). Reliability is explicit: every rank agrees on an
out-of-memory backoff (which keeps the global batch and the data order) and on a stop signal
(SIGTERM/SIGUSR1 -> save -> exit 0); checkpoints and resume live in checkpointer.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

from argonne_ds.checkpoint.checkpointer import Checkpointer, TrainState
from argonne_ds.checkpoint.store import CHECKPOINTS, resume_candidates
from argonne_ds.config import ArgonneConfig, load_model_config
from argonne_ds.data.loader import build_data_iterator
from argonne_ds.data.stream import ResumableShardIterator
from argonne_ds.data.tokenizer import LoadedTokenizer
from argonne_ds.engine.distributed import check_shared_dirs, init_distributed
from argonne_ds.engine.ds_config import pipeline_stages, resolve_ds_config
from argonne_ds.engine.engine import Batch, Engine, StepResult
from argonne_ds.metrics import MetricsSink, flops_per_token, format_duration, peak_tflops, say
from argonne_ds.reliability import (
    Exit,
    JobError,
    StopFlag,
    Watchdog,
    is_oom,
    read_backoff,
    write_backoff,
)
from argonne_ds.reliability.faults import Faults
from argonne_ds.reliability.guard import BadStepGuard, parse_steps
from argonne_ds.run_config import DEFAULT_CACHE_DIR, ConfigError, RunConfig

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """What the loop works with."""

    run: RunConfig
    engine: Engine
    data: ResumableShardIterator
    tok: LoadedTokenizer
    checkpointer: Checkpointer
    sink: MetricsSink
    state: TrainState
    max_steps: int
    bar: Any = None

    @property
    def rank0(self) -> bool:
        return self.engine.global_rank == 0

    @property
    def tokens_per_step(self) -> int:
        return self.engine.global_batch_size * self.run.data.block_size

    def say(self, line: str) -> None:
        say(self.rank0, line, self.bar)


def train(run: RunConfig) -> int:
    job = setup(run)
    engine, data, state, rank = job.engine, job.data, job.state, job.engine.global_rank
    job.say(f"[train] {engine.mode} on {engine.world_size} ranks (data-parallel "
            f"{engine.dp_world}), global batch {engine.global_batch_size} x "
            f"{run.data.block_size} tokens, steps {state.step} -> {job.max_steps}, output "
            f"{run.checkpoint.output_dir}")
    job.bar = tqdm(total=job.max_steps, initial=state.step, disable=None if job.rank0 else True,
                   unit="step", dynamic_ncols=True)
    hooks = [ProgressLog(job), HeldOutEval(job), Sample(job)]
    if engine.compiled_blocks:
        hooks.insert(0, CompileReport(job))
    stop, watchdog, faults = StopFlag(), Watchdog(rank, run.reliability.step_timeout), Faults(rank)
    guard = _guard(run, state)
    engine.guard_updates(lambda loss, norm: guard.verdict(state.step + 1, loss, norm))
    faults.install(engine.module)
    while state.step < job.max_steps:
        step, recorder, t0 = state.step + 1, _Recorder(data), time.perf_counter()
        watchdog.arm(f"step {step}")
        try:
            faults.begin(step)
            result = engine.train_step(recorder)
            stopping = engine.any_rank(stop.signal is not None)[0]  # one branch for all ranks
            watchdog.disarm(time.perf_counter() - t0)
            state.step, state.tokens = step, state.tokens + job.tokens_per_step
            job.bar.update(1)
            note = guard.settle(step, result.skipped)
            job.sink.log({"step": step, "loss": result.loss, "lr": result.lr,
                          "grad_norm": result.grad_norm, "tokens": state.tokens,
                          "samples": data.samples, "epoch": data.epoch,
                          "micro_batch": engine.micro_batch_size, "skipped": bool(note),
                          "skipped_steps": guard.skipped, "data_crc": engine.gather(recorder.crc),
                          "step_s": time.perf_counter() - t0})
            if note:
                job.say(note)
                guard.stop_if_stuck(step, job.checkpointer.newest)
            watchdog.arm(f"the evaluation, sample or save after step {step}", long=True)
            for hook in hooks:
                hook(state, result)
        except Exception as e:  # noqa: BLE001 - only OOMs are handled; the rest re-raised
            if is_oom(e):
                _out_of_memory(job, step, e)
            raise
        if step % run.checkpoint.save_interval == 0 or step == job.max_steps or stopping:
            state.guard = guard.state_dict()
            job.checkpointer.save(state)
        watchdog.disarm()
        if stopping:
            job.say(f"[train] stop signal received: checkpoint at step {state.step} saved, "
                    "exiting 0; relaunch to resume")
            break
    job.bar.close()
    job.sink.close()
    return 0


def setup(run: RunConfig) -> Job:
    """Model config, DeepSpeed JSON, engine, data, resume, run config on disk, metrics."""
    init_distributed()
    model_config = _model_config(run)
    if run.data.block_size > model_config.max_position_embeddings:
        logger.warning("--block-size %d exceeds the model's context; using %d",
                       run.data.block_size, model_config.max_position_embeddings)
        run.data.block_size = model_config.max_position_embeddings
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backoff = read_backoff(run.checkpoint.output_dir)
    ds_config, max_steps, notes = resolve_ds_config(
        run, world, micro_cap=backoff and int(backoff["micro_batch_size"]))
    dp = world // pipeline_stages(ds_config)
    if run.data.cache_dir is None and dp > 1:
        # Streaming, every data-parallel rank would tokenize the whole stream to keep its share.
        run.data.cache_dir = DEFAULT_CACHE_DIR
        notes.append(f"no --cache-dir: the {dp} data-parallel ranks share a token cache in "
                     f"{DEFAULT_CACHE_DIR}, built once, instead of each tokenizing the stream")
    check_shared_dirs({"--output-dir": run.checkpoint.output_dir,
                       "--cache-dir": run.data.cache_dir})
    init_state = _initial_weights(run)
    engine = Engine(model_config, ds_config, run.train.weight_decay, run.train.seed, init_state)
    rank0 = engine.global_rank == 0
    for note in notes:
        say(rank0, f"[config] {note}")
    data, tok = build_data_iterator(
        run.data, global_batch_size=engine.global_batch_size,
        micro_batch_size=engine.micro_batch_size, dp_rank=engine.dp_rank,
        dp_world=engine.dp_world, model_vocab_size=model_config.vocab_size, show_progress=rank0)
    check_document_separator(model_config, tok)
    resolved = {"run": run.to_dict(), "deepspeed": ds_config, "model": model_config.to_dict(),
                "max_steps": max_steps, "mode": engine.mode, "world_size": world}
    checkpointer = Checkpointer(run, engine, data, tok, resolved)
    state = checkpointer.resume()
    if run.train.from_hf and state.step == 0:
        state = checkpointer.carry_import(state)
    out = Path(run.checkpoint.output_dir)
    if rank0:  # after the resume checks: a refused resume leaves the old files as they were
        out.mkdir(parents=True, exist_ok=True)
        run.write(out / "run_config.yaml")
        (out / "resolved_config.json").write_text(json.dumps(resolved, indent=1, default=str))
    sink = MetricsSink(out, state.run_id, resolved, enabled=rank0)
    state.run_id = sink.run_id
    return Job(run, engine, data, tok, checkpointer, sink, state, max_steps)


def _model_config(run: RunConfig) -> ArgonneConfig:
    if run.train.from_hf:
        from argonne_ds.convert.export import hf_model_config

        return hf_model_config(run.train.from_hf)
    return load_model_config(run.train.model)


def check_document_separator(config: ArgonneConfig, tok: LoadedTokenizer) -> None:
    """Document masking/positions find documents by the model config's separator id: another id
    than the one the data was packed with would, silently, make each block one document."""
    if config.uses_document_ids and config.document_separator_id != tok.separator_id:
        raise ConfigError(
            f"the model config's document_separator_id is {config.document_separator_id}, but "
            f"the tokenizer {tok.path} ends documents with {tok.separator!r} = "
            f"{tok.separator_id}; set document_separator_id to {tok.separator_id}")


def _initial_weights(run: RunConfig) -> Mapping[str, torch.Tensor] | None:
    """With --from-hf, its weights, read lazily; none when a checkpoint will be resumed (it
    would overwrite them) or without --from-hf (initialised from the seed)."""
    out = Path(run.checkpoint.output_dir) / CHECKPOINTS
    if not run.train.from_hf or run.checkpoint.checkpoint_path or resume_candidates(out):
        return None
    from argonne_ds.convert.export import import_hf

    return import_hf(run.train.from_hf)[1]


# ---- hooks: called after every step, on every rank (eval and samples run collectives) ----------


class ProgressLog:
    """Every --log-interval steps: loss, LR, grad norm, tok/s, MFU, tokens, data position, ETA."""

    def __init__(self, job: Job) -> None:
        self.job, self.steps, self.t0 = job, 0, time.perf_counter()
        self.flops_tok = flops_per_token(job.engine.model_config, job.run.data.block_size)
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.peak = peak_tflops(name, job.run.log.peak_tflops)

    def __call__(self, state: TrainState, result: StepResult) -> None:
        job, self.steps = self.job, self.steps + 1
        if state.step % job.run.log.log_interval and state.step != job.max_steps:
            return
        dt = time.perf_counter() - self.t0
        tok_s = self.steps * job.tokens_per_step / dt
        eta = format_duration((job.max_steps - state.step) * dt / self.steps)
        util = tok_s * self.flops_tok / (job.engine.world_size * (self.peak or 1) * 1e12)
        mfu = f" | MFU {100 * util:.1f}%" if self.peak else ""
        gn = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "-"
        job.say(f"[train] step {state.step}/{job.max_steps} | loss {result.loss:.4f} | lr "
                f"{result.lr:.2e} | gnorm {gn} | {tok_s:,.0f} tok/s{mfu} | tokens "
                f"{state.tokens / 1e6:,.2f}M | data epoch {job.data.epoch} sample "
                f"{job.data.samples:,} | ETA {eta}")
        job.sink.log({"step": state.step, "event": "throughput", "tok_s": tok_s})
        self.steps, self.t0 = 0, time.perf_counter()


class CompileReport:
    """With torch_compile: how long the first step took (it compiles), and after the second the
    compilation's cost (the difference), on the console and in the metrics."""

    def __init__(self, job: Job) -> None:
        self.job, self.t0 = job, time.perf_counter()
        self.first: float | None = None  # step 1's seconds, until step 2 reports
        self.done = False

    def __call__(self, state: TrainState, result: StepResult) -> None:
        now = time.perf_counter()
        took, self.t0 = now - self.t0, now
        if self.done:
            return
        if self.first is None:
            self.first = took
            opts = self.job.engine.compile_options
            self.job.say(f"[compile] torch.compile ({opts['backend']}"
                         f"{', mode ' + opts['mode'] if opts['mode'] else ''}) of "
                         f"{self.job.engine.compiled_blocks} blocks: the first step took "
                         f"{took:.1f} s, compilation included")
            return
        self.job.say(f"[compile] compiling cost ~{self.first - took:.1f} s (step "
                     f"{state.step - 1} {self.first:.1f} s, step {state.step} {took:.1f} s)")
        self.job.sink.log({"step": state.step, "event": "compile", "compile_s": self.first - took})
        self.done = True


class HeldOutEval:
    """Every --eval-interval steps: the loss on the same --eval-batches held-out micro-batches."""

    def __init__(self, job: Job) -> None:
        self.job, self.batches = job, _eval_batches(job)

    def __call__(self, state: TrainState, result: StepResult) -> None:
        if not self.batches or state.step % self.job.run.log.eval_interval:
            return
        loss = self.job.engine.eval_loss(self.batches)
        ppl = math.exp(min(loss, 50))
        self.job.sink.log({"step": state.step, "event": "eval", "eval_loss": loss,
                           "eval_ppl": ppl})
        self.job.say(f"[eval] step {state.step} | held-out loss {loss:.4f} | perplexity "
                     f"{ppl:,.1f}")


class Sample:
    """Every --sample-interval steps: a greedy continuation of --sample-prompt."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def __call__(self, state: TrainState, result: StepResult) -> None:
        log, tok = self.job.run.log, self.job.tok
        if not log.sample_interval or state.step % log.sample_interval:
            return
        prompt = tok.backend.encode(log.sample_prompt, add_special_tokens=False).ids
        new = self.job.engine.generate(prompt, log.sample_tokens, stop_id=tok.separator_id)
        text = tok.backend.decode(prompt + new)
        self.job.sink.text(state.step, "sample", text)
        self.job.say(f"[sample] step {state.step}: {text!r}")


def _eval_batches(job: Job) -> list[Batch]:
    log, engine = job.run.log, job.engine
    if not log.eval_interval or not log.eval_data_glob:
        return []
    # The training tokenizer (the fallback included), every block in order.
    data = dataclasses.replace(job.run.data, data_glob=list(log.eval_data_glob),
                               shuffle_window=0, tokenizer_path=job.tok.path)
    micro = engine.micro_batch_size
    it, _ = build_data_iterator(data, global_batch_size=micro * engine.dp_world,
                                micro_batch_size=micro, dp_rank=engine.dp_rank,
                                dp_world=engine.dp_world,
                                model_vocab_size=engine.model_config.vocab_size,
                                show_progress=False)
    return [next(it) for _ in range(log.eval_batches)]


# ---- reliability ------------------------------------------------------------------------------


def _guard(run: RunConfig, state: TrainState) -> BadStepGuard:
    cfg = run.reliability
    guard = BadStepGuard(cfg.skip_sigma, cfg.skip_window, cfg.max_skips_in_a_row,
                         parse_steps(cfg.skip_steps))
    if state.guard:
        guard.load_state_dict(state.guard)
    return guard


def _out_of_memory(job: Job, step: int, error: BaseException) -> NoReturn:
    """Out of memory in a step, an evaluation or a sample. The other ranks may be waiting for
    this one inside a collective (a pipeline's send/receive, ZeRO-3's gathers) that nothing can
    interrupt, so no in-process recovery: record half the micro-batch for the next launch and
    exit RELAUNCH; the launcher stops the other ranks, launch/train.sh relaunches, and the job
    resumes from the last checkpoint with the same global batch and data order (accumulation
    doubles)."""
    micro, rank = job.engine.micro_batch_size, job.engine.global_rank
    if micro // 2 < job.run.train.min_micro_batch_size or micro % 2:
        raise JobError(f"out of memory at micro-batch {micro}, the floor (--min-micro-batch-size "
                       f"{job.run.train.min_micro_batch_size}): the model does not fit; add "
                       "pipeline stages, use ZeRO-3 (offload), or enable activation "
                       "checkpointing", Exit.NO_FIT) from None
    path = write_backoff(job.run.checkpoint.output_dir, micro // 2, micro, step, rank,
                         f"{type(error).__name__}: {error}")
    raise JobError(f"rank {rank} ran out of memory in step {step} at micro-batch {micro} "
                   f"({' '.join(str(error).split())[:200]}); the next launch uses micro-batch "
                   f"{micro // 2} (same global batch, accumulation doubled; {path}) and resumes "
                   "from the last checkpoint: launch/train.sh relaunches by itself "
                   "(MAX_RESTARTS)", Exit.RELAUNCH) from None


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
