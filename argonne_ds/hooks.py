"""The job the loop works with (`Job`), and what the loop calls after every step, on every rank
(evaluations and samples run collectives): the progress line, the compile report, the held-out
evaluation, a sample."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from argonne_ds.checkpoint.checkpointer import Checkpointer, TrainState
from argonne_ds.data.loader import build_data_iterator
from argonne_ds.data.stream import ResumableShardIterator
from argonne_ds.data.tokenizer import LoadedTokenizer
from argonne_ds.engine.engine import Batch, Engine, StepResult
from argonne_ds.metrics import MetricsSink, flops_per_token, format_duration, peak_tflops, say
from argonne_ds.run_config import RunConfig


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
