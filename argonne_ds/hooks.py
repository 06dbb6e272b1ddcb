"""The job the loop works with (`Job`), and what the loop calls after every step, on every rank
(evaluations and samples run collectives): the progress line, the compile report, the held-out
evaluation, a sample."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from argonne_ds.checkpoint.checkpointer import Checkpointer, TrainState
from argonne_ds.data.loader import build_data_iterator
from argonne_ds.data.mixture import Mixture
from argonne_ds.data.stream import ResumableShardIterator
from argonne_ds.data.tokenizer import LoadedTokenizer
from argonne_ds.engine.engine import Batch, Engine, StepResult
from argonne_ds.extension import Launch
from argonne_ds.metrics import MetricsSink, flops_per_token, format_duration, peak_tflops, say
from argonne_ds.phases import parse_sources
from argonne_ds.run_config import RunConfig

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
    launch: Launch | None = None  # this launch's context (extension.py)

    @property
    def rank0(self) -> bool:
        return self.engine.global_rank == 0

    @property
    def block_size(self) -> int:
        """Tokens per sample in this launch (a context phase's, else data.block_size)."""
        return self.launch.block_size if self.launch else self.run.data.block_size

    @property
    def tokens_per_step(self) -> int:
        return self.engine.global_batch_size * self.block_size

    def source_tokens(self, g: int) -> list[int]:
        """Tokens drawn from each source by global sample g (each phase at its block size)."""
        mix = self.mixture
        assert mix is not None
        contexts = self.launch.contexts if self.launch else None
        if not contexts:
            return [int(c) * self.block_size for c in mix.blend.counts(g).tolist()]
        total = [0] * len(mix.names)
        for i, c in enumerate(contexts):
            end = contexts[i + 1].start_sample if i + 1 < len(contexts) else g
            if c.start_sample >= g:
                break
            drawn = mix.blend.counts(min(end, g)) - mix.blend.counts(c.start_sample)
            total = [t + int(d) * c.block_size for t, d in zip(total, drawn.tolist())]
        return total

    def say(self, line: str) -> None:
        say(self.rank0, line, self.bar)

    @property
    def mixture(self) -> Mixture | None:
        """The blend of named sources (data.sources), or None for one data_glob."""
        source = self.data.source
        return source if isinstance(source, Mixture) else None

    def mixture_fields(self) -> dict[str, Any]:
        """For the step's record: the phase, tokens drawn from each source so far, each
        source's share of the current phase's samples (realised, beside its weight) and the
        passes over it."""
        mix = self.mixture
        if mix is None:
            return {}
        g, blend = self.data.samples, mix.blend
        p = blend.phase_of(max(g - 1, 0))
        counts, base = blend.counts(g), blend.counts(blend.spans[p].start)
        drawn = max(g - blend.spans[p].start, 1)
        out: dict[str, Any] = {"phase": mix.records[p]["name"], "phase_index": p}
        for name, c, b, ep, t in zip(mix.names, counts.tolist(), base.tolist(),
                                     mix.epochs(g).values(), self.source_tokens(g)):
            out[f"tokens/{name}"] = t
            out[f"share/{name}"] = (c - b) / drawn
            if ep is not None:
                out[f"epochs/{name}"] = ep
        return out


def say_plan(job: Job) -> None:
    """At start: each phase's steps, weights and tokens per source, and the passes each source
    will see over the budget; a warning for a source read more than data.max_repeats times."""
    mix = job.mixture
    if mix is None:
        return
    G = job.engine.global_batch_size
    blend = mix.blend
    total = job.launch.samples_at(job.max_steps, G) if job.launch else job.max_steps * G
    ends = [s.start for s in blend.spans[1:]] + [total]
    contexts = job.launch.contexts if job.launch else None
    job.say(f"[plan] {len(blend.spans)} phase(s) over {job.max_steps:,} steps "
            f"({_tokens(sum(job.source_tokens(total)))} tokens), sources "
            f"{', '.join(mix.names)}")
    for p, (span, end) in enumerate(zip(blend.spans, ends)):
        if span.start >= total:
            job.say(f"[plan] phase {span.name!r} starts after the budget: not reached")
            continue
        end = min(end, total)
        T = contexts[p].block_size if contexts else job.block_size
        drawn = blend.counts(end) - blend.counts(span.start)
        shares = " | ".join(
            f"{n} {mix.records[p].get('weights', {}).get(n, 0):g} -> {_tokens(int(c) * T)} tok"
            for n, c in zip(mix.names, drawn) if c)
        decay = mix.records[p].get("decay")
        first = int(mix.records[p].get("start") or 0) + 1
        last = mix.records[p + 1]["start"] if end < total else job.max_steps
        size = f", {T:,}-token blocks" if contexts else ""
        job.say(f"[plan] phase {span.name!r}: steps {first}-{last}{size}"
                f"{', LR decays ' + decay if decay else ''}: {shares}")
    passes = mix.epochs(total)
    job.say("[plan] passes over each source by the end: " + ", ".join(
        f"{n} {'?' if e is None else f'{e:.2f}'}" for n, e in passes.items()))
    for name, e in passes.items() if job.rank0 else ():
        if e is not None and e > job.run.data.max_repeats:
            logger.warning("source %r will be read %.1f times over the plan (more than "
                           "data.max_repeats %g): a small source repeats; add data or lower "
                           "its weight", name, e, job.run.data.max_repeats)


def _tokens(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:,.2f}{unit}"
    return str(n)


class PhaseLog:
    """When a step begins a phase (or a run starts inside one): one line and a `phase` event."""

    def __init__(self, job: Job) -> None:
        self.job, self.phase = job, None

    def __call__(self, state: TrainState, result: StepResult) -> None:
        fields = self.job.mixture_fields()
        if not fields or fields["phase_index"] == self.phase:
            return
        self.phase = fields["phase_index"]
        record = self.job.mixture.records[self.phase]
        self.job.say(f"[phase] step {state.step}: phase {record['name']!r} (weights "
                     + ", ".join(f"{k} {v:g}" for k, v in record.get("weights", {}).items() if v)
                     + (f"; LR decays {record['decay']}" if record.get("decay") else "") + ")")
        self.job.sink.log({"step": state.step, "event": "phase", "phase": record["name"],
                           "phase_index": self.phase})


class ProgressLog:
    """Every --log-interval steps: loss, LR, grad norm, tok/s, MFU, tokens, data position, ETA."""

    def __init__(self, job: Job) -> None:
        self.job, self.steps, self.t0 = job, 0, time.perf_counter()
        self.flops_tok = flops_per_token(job.engine.model_config, job.block_size)
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
        mix = job.mixture_fields()
        where = (f"phase {mix['phase']} " + " ".join(
            f"{k[6:]} {100 * v:.0f}%" for k, v in mix.items() if k.startswith("share/"))
            if mix else f"data epoch {job.data.epoch}")
        job.say(f"[train] step {state.step}/{job.max_steps} | loss {result.loss:.4f} | lr "
                f"{result.lr:.2e} | gnorm {gn} | {tok_s:,.0f} tok/s{mfu} | tokens "
                f"{state.tokens / 1e6:,.2f}M | {where} sample {job.data.samples:,} | ETA {eta}")
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
    """Every --eval-interval steps: the loss on the same --eval-batches held-out micro-batches
    of --eval-data-glob, and of each source's eval_data_glob (`eval_loss/<source>`)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        log = job.run.log
        column = job.run.data.text_column
        held = {"": (list(log.eval_data_glob), column)} if log.eval_data_glob else {}
        held |= {s.name: (list(s.eval_data_glob), s.text_column or column)
                 for s in parse_sources(job.run.data.sources) if s.eval_data_glob}
        self.batches = {name: _eval_batches(job, *where) for name, where in held.items()} \
            if log.eval_interval else {}

    def __call__(self, state: TrainState, result: StepResult) -> None:
        if not self.batches or state.step % self.job.run.log.eval_interval:
            return
        record: dict[str, Any] = {"step": state.step, "event": "eval"}
        parts = []
        for name, batches in self.batches.items():
            # The loss, and by position (does the loss past the old context fall?), one pass.
            loss, by_position = self.job.engine.eval_by_position(batches)
            key = f"eval_loss/{name}" if name else "eval_loss"
            record[key] = loss
            record |= {f"{key}_pos/{span}": v for span, v in by_position.items()}
            if not name:
                record["eval_ppl"] = ppl = math.exp(min(loss, 50))
                parts.append(f"held-out loss {loss:.4f} | perplexity {ppl:,.1f}")
                if by_position:
                    parts.append("by position " + ", ".join(
                        f"{span} {v:.3f}" for span, v in by_position.items()))
            else:
                parts.append(f"{name} {loss:.4f}")
        self.job.sink.log(record)
        self.job.say(f"[eval] step {state.step} | " + " | ".join(parts))


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


def _eval_batches(job: Job, globs: list[str], text_column: str) -> list[Batch]:
    log, engine = job.run.log, job.engine
    # The training tokenizer (the fallback included), every block in order.
    data = dataclasses.replace(job.run.data, data_glob=globs, sources=[], text_column=text_column,
                               shuffle_window=0, tokenizer_path=job.tok.path,
                               block_size=job.block_size)
    micro = engine.micro_batch_size
    it, _ = build_data_iterator(data, global_batch_size=micro * engine.dp_world,
                                micro_batch_size=micro, dp_rank=engine.dp_rank,
                                dp_world=engine.dp_world,
                                model_vocab_size=engine.model_config.vocab_size,
                                show_progress=False)
    return [next(it) for _ in range(log.eval_batches)]
