"""The training loop: one global batch per step, until the budget is spent or a signal stops it.

`setup` builds what the loop works with (engine, data, checkpointer, metrics) from a RunConfig;
`train` reads top to bottom. What the loop does besides stepping hangs off named hooks
(`ProgressLog`, `HeldOutEval`, `Sample`). Reliability is explicit: every rank agrees on an
out-of-memory backoff (which keeps the global batch and the data order) and on a stop signal
(SIGTERM/SIGUSR1 -> save -> exit 0); checkpoints and resume live in checkpoint/.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

from argonne_ds.checkpoint.checkpointer import Checkpointer, TrainState
from argonne_ds.checkpoint.store import resume_step_of
from argonne_ds.config import ArgonneConfig, load_model_config
from argonne_ds.data.loader import build_data_iterator
from argonne_ds.data.tokenizer import LoadedTokenizer
from argonne_ds.engine.distributed import check_shared_dirs, from_rank0, init_distributed
from argonne_ds.engine.ds_config import pipeline_stages
from argonne_ds.engine.engine import Batch, Engine
from argonne_ds.extension import plan_launch
from argonne_ds.hooks import (
    CompileReport,
    HeldOutEval,
    Job,
    PhaseLog,
    ProgressLog,
    Sample,
    say_plan,
)
from argonne_ds.metrics import MetricsSink, say
from argonne_ds.phases import plan_of
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
from argonne_ds.schedule import wsd_shape

logger = logging.getLogger(__name__)


def train(run: RunConfig) -> int:
    job = setup(run)
    engine, data, state, rank = job.engine, job.data, job.state, job.engine.global_rank
    job.say(f"[train] {engine.mode} on {engine.world_size} ranks (data-parallel "
            f"{engine.dp_world}), global batch {engine.global_batch_size} x "
            f"{job.block_size} tokens, steps {state.step} -> {job.max_steps}, output "
            f"{run.checkpoint.output_dir}")
    job.bar = tqdm(total=job.max_steps, initial=state.step, disable=None if job.rank0 else True,
                   unit="step", dynamic_ncols=True)
    say_plan(job)
    hooks = [PhaseLog(job), ProgressLog(job), HeldOutEval(job), Sample(job)]
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
                          "step_s": time.perf_counter() - t0, **job.mixture_fields()})
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
        job.checkpointer.poll()  # a save written in the background is published when complete
        final = step in (job.max_steps, job.launch.end_step) or stopping
        if step % run.checkpoint.save_interval == 0 or final:
            state.guard = guard.state_dict()
            job.checkpointer.save(state, final=final)
        watchdog.disarm()
        if step == job.launch.end_step and not stopping and step < job.max_steps:
            _next_context(job)
        if stopping:
            job.say(f"[train] stop signal received: checkpoint at step {state.step} saved, "
                    "exiting 0; relaunch to resume")
            break
    job.bar.close()
    job.sink.close()
    return 0


def setup(run: RunConfig) -> Job:
    """Model config, DeepSpeed JSON, engine, data, resume, run config on disk, metrics."""
    plan = plan_of(run)  # bad sources and phases are named before anything is loaded
    if plan is not None:
        from argonne_ds.data.loader import source_shards

        source_shards(plan)
    init_distributed()
    model_config = _model_config(run)
    if run.data.block_size > model_config.max_position_embeddings:
        logger.warning("--block-size %d exceeds the model's context; using %d",
                       run.data.block_size, model_config.max_position_embeddings)
        run.data.block_size = model_config.max_position_embeddings
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backoff = read_backoff(run.checkpoint.output_dir)
    # Every rank alike (ZeRO-3's init gathers); the step picks the phase's context.
    resume_step = from_rank0(resume_step_of(run.checkpoint.output_dir,
                                            run.checkpoint.checkpoint_path))
    launch, model_config, ds_config, max_steps, notes = plan_launch(
        run, plan, model_config, world, backoff and int(backoff["micro_batch_size"]),
        resume_step)
    lr_shape = wsd_shape(run, plan, max_steps)
    if lr_shape is not None:
        ds_config.pop("scheduler", None)
        notes.append(f"learning rate: warmup-stable-decay ({lr_shape.warmup} warmup steps, the "
                     f"peak until step {lr_shape.decay_start}, then {lr_shape.shape} to "
                     f"{lr_shape.floor:g} by step {lr_shape.decay_end}) instead of the JSON's "
                     "scheduler")
    dp = world // pipeline_stages(ds_config)
    if run.data.cache_dir is None and dp > 1:
        # Streaming, every data-parallel rank would tokenize the whole stream to keep its share.
        run.data.cache_dir = DEFAULT_CACHE_DIR
        notes.append(f"no --cache-dir: the {dp} data-parallel ranks share a token cache in "
                     f"{DEFAULT_CACHE_DIR}, built once, instead of each tokenizing the stream")
    check_shared_dirs({"--output-dir": run.checkpoint.output_dir,
                       "--cache-dir": run.data.cache_dir})
    resuming = resume_step is not None
    engine = Engine(model_config, ds_config, run.train.weight_decay, run.train.seed,
                    None if resuming else _hf_weights(run), init_weights=not resuming,
                    lr_shape=lr_shape)
    rank0 = engine.global_rank == 0
    for note in notes:
        say(rank0, f"[config] {note}")
    data, tok = build_data_iterator(
        run.data, global_batch_size=engine.global_batch_size,
        micro_batch_size=engine.micro_batch_size, dp_rank=engine.dp_rank,
        dp_world=engine.dp_world, model_vocab_size=model_config.vocab_size, show_progress=rank0,
        plan=plan, contexts=launch.contexts)
    check_document_separator(model_config, tok)
    resolved = {"run": run.to_dict(), "deepspeed": ds_config, "model": model_config.to_dict(),
                "max_steps": max_steps, "mode": engine.mode, "world_size": world}
    checkpointer = Checkpointer(run, engine, data, tok, resolved, launch)
    state = checkpointer.resume()
    launch.check_resumed(state.step)
    if run.train.from_hf and state.step == 0:
        state = checkpointer.carry_import(state)
    checkpointer.check_space(at_start=True)
    out = Path(run.checkpoint.output_dir)
    if rank0:  # after the resume checks: a refused resume leaves the old files as they were
        out.mkdir(parents=True, exist_ok=True)
        run.write(out / "run_config.yaml")
        (out / "resolved_config.json").write_text(json.dumps(resolved, indent=1, default=str))
    sink = MetricsSink(out, state.run_id, resolved, enabled=rank0)
    state.run_id, checkpointer.sink = sink.run_id, sink
    return Job(run, engine, data, tok, checkpointer, sink, state, max_steps, launch=launch)


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


def _hf_weights(run: RunConfig) -> Mapping[str, torch.Tensor] | None:
    """With --from-hf, its weights, read lazily; else none (initialised from the seed)."""
    if not run.train.from_hf:
        return None
    from argonne_ds.convert.export import import_hf

    return import_hf(run.train.from_hf)[1]


def _next_context(job: Job) -> NoReturn:
    """Saved at the last step of this launch's context: the next launch builds the next."""
    job.bar.close()
    job.sink.close()
    nxt = job.launch.context_at(job.state.step + 1)
    assert nxt is not None and job.launch.plan is not None
    name = job.launch.plan.phases[job.launch.plan.phase_at(job.state.step + 1)].name
    raise JobError(f"[phase] step {job.state.step} saved; phase {name!r} trains with "
                   f"{nxt.block_size:,}-token blocks x {nxt.global_batch} from step "
                   f"{job.state.step + 1}: the next launch builds it (launch/train.sh launches "
                   "it at once; by hand, run the same command again)", Exit.NEXT_PHASE,
                   everywhere=True)


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
