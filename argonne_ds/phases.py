"""A run in phases: named data sources, the phases that weight them, checked before anything runs.

    data:
      sources:                        # each a set of parquet shards, one tokenizer for all
        - {name: web,  data_glob: "data/web/*.parquet",  weight: 0.7}
        - {name: code, data_glob: ["data/code/*.parquet"], weight: 0.3,
           eval_data_glob: ["data/code-heldout/*.parquet"]}
    phases:                           # optional; without it one phase, the sources' weights
      - {name: stable, start: 0}
      - {name: anneal, start: 9000, weights: {web: 0.3, code: 0.7}, decay: 1-sqrt}

A phase starts at an optimizer step and lasts until the next one starts (the last: to the end of
the budget). Its `weights` (default: the sources' own) decide the mix of its samples
(data/mixture.py); `decay` (linear | cosine | 1-sqrt) makes the learning rate fall to its floor
over the phase (schedule.py: warmup-stable-decay). A single `data_glob` is the one-source run of
before, unchanged.

A context extension is a phase too: `block_size` (and usually `rope_parameters`, as in the model
config) change the context from its start on, for it and the phases after it; the global batch
keeps its tokens per step (fewer, longer samples) unless the phase gives `global_batch_size`.
The data position carries over by tokens (data/layout.py); the job saves at the phase's start and
relaunches itself with the new context (trainer.py, Exit.NEXT_PHASE).

No torch here, and no file is read: `validate_plan` names the bad source or
phase before anything is loaded or written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from argonne_ds.run_config import ConfigError, RunConfig

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
SOURCE_KEYS = ("name", "data_glob", "weight", "text_column", "eval_data_glob")
PHASE_KEYS = ("name", "start", "weights", "decay", "block_size", "rope_parameters",
              "global_batch_size")
CONTEXT_KEYS = ("block_size", "rope_parameters", "global_batch_size")


@dataclass(frozen=True)
class Source:
    name: str
    data_glob: tuple[str, ...]
    weight: float = 1.0
    text_column: str | None = None  # default: data.text_column
    eval_data_glob: tuple[str, ...] = ()


@dataclass(frozen=True)
class Phase:
    name: str
    start: int  # the first optimizer step of the phase (0-based: step start+1 is its first)
    weights: dict[str, float] = field(default_factory=dict)  # every source, 0 where unnamed
    decay: str | None = None
    block_size: int | None = None  # a context extension: tokens per sample from here on
    rope_parameters: dict[str, Any] | None = None  # the model's RoPE from here on
    global_batch_size: int | None = None  # samples per step from here on

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of a started phase, to refuse a change to it on resume."""
        out = {"name": self.name, "start": self.start, "weights": dict(self.weights),
               "decay": self.decay}
        out.update({k: getattr(self, k) for k in CONTEXT_KEYS if getattr(self, k) is not None})
        return out


@dataclass(frozen=True)
class Context:
    """What a phase trains with: tokens per sample, samples per step, RoPE (None: the model
    config's own), and the phase's first global sample."""

    block_size: int
    global_batch: int
    rope_parameters: dict[str, Any] | None
    start_sample: int

    @property
    def key(self) -> tuple[int, int, str]:
        """Equal for two phases that one engine and one data layout can both run."""
        return self.block_size, self.global_batch, repr(self.rope_parameters)


@dataclass(frozen=True)
class Plan:
    sources: tuple[Source, ...]
    phases: tuple[Phase, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    def phase_at(self, step: int) -> int:
        """The index of the phase optimizer step `step` (1-based) belongs to."""
        return max(i for i, p in enumerate(self.phases) if p.start < step or i == 0)

    @property
    def changes_context(self) -> bool:
        return any(getattr(p, k) is not None for p in self.phases for k in CONTEXT_KEYS)

    def contexts(self, block_size: int, global_batch: int) -> list[Context]:
        """Each phase's context, from the run's own (data.block_size, the JSON's global batch)."""
        out: list[Context] = []
        T, G, rope, sample = block_size, global_batch, None, 0
        for i, p in enumerate(self.phases):
            if i:
                sample += (p.start - self.phases[i - 1].start) * G
            if p.block_size is not None and p.global_batch_size is None:
                tokens = T * G  # kept: fewer, longer samples
                if tokens % p.block_size:
                    raise ConfigError(
                        f"phase {p.name!r}: block_size {p.block_size} does not divide the "
                        f"{tokens:,} tokens of a step ({G} x {T}); give the phase a "
                        "global_batch_size")
                G = tokens // p.block_size
            T = p.block_size or T
            G = p.global_batch_size or G
            rope = p.rope_parameters if p.rope_parameters is not None else rope
            out.append(Context(T, G, rope, sample))
        return out


def _globs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: data_glob must be a glob or a list of globs, got {value!r}")


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: the weight must be a number, got {value!r}")
    try:
        w = float(value)
    except ValueError:
        raise ConfigError(f"{where}: the weight must be a number, got {value!r}") from None
    if not math.isfinite(w) or w < 0:
        raise ConfigError(f"{where}: the weight must be >= 0, got {value!r}")
    return w


def _unknown_keys(raw: dict, allowed: tuple[str, ...], where: str) -> None:
    extra = sorted(set(raw) - set(allowed))
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r} (a {where.split()[0]} takes "
                          f"{', '.join(allowed)})")


def parse_sources(raw: list[Any]) -> tuple[Source, ...]:
    out: list[Source] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
                not item["name"]:
            raise ConfigError(f"data.sources[{i}] needs a name: {{name: web, data_glob: ..., "
                              f"weight: ...}}, got {item!r}")
        where = f"source {item['name']!r}"
        _unknown_keys(item, SOURCE_KEYS, where)
        if "data_glob" not in item:
            raise ConfigError(f"{where}: give its data_glob")
        if any(s.name == item["name"] for s in out):
            raise ConfigError(f"{where} is named twice in data.sources")
        out.append(Source(item["name"], _globs(item["data_glob"], where),
                          _weight(item.get("weight", 1.0), where), item.get("text_column"),
                          _globs(item["eval_data_glob"], where) if item.get("eval_data_glob")
                          else ()))
    return tuple(out)


def parse_phases(raw: list[Any], sources: tuple[Source, ...]) -> tuple[Phase, ...]:
    names = [s.name for s in sources]
    if not raw:
        return (Phase("main", 0, {s.name: s.weight for s in sources}),)
    out: list[Phase] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"phases[{i}] needs a name and a start: {{name: stable, start: 0}},"
                              f" got {item!r}")
        where = f"phase {item['name']!r}"
        _unknown_keys(item, PHASE_KEYS, where)
        start = item.get("start", 0 if i == 0 else None)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"{where}: start must be a step >= 0, got {start!r}")
        if i == 0 and start != 0:
            raise ConfigError(f"{where}: the first phase starts at step 0, not {start}")
        if out and start <= out[-1].start:
            raise ConfigError(f"{where} starts at step {start}, not after phase "
                              f"{out[-1].name!r} (step {out[-1].start}): list phases in order")
        if any(p.name == item["name"] for p in out):
            raise ConfigError(f"{where} is named twice in phases")
        given = item.get("weights")
        if given is None:
            weights = {s.name: s.weight for s in sources}
        elif isinstance(given, dict):
            for name in given:
                if name not in names:
                    raise ConfigError(f"{where} names source {name!r}, which data.sources does "
                                      f"not define (sources: {', '.join(names)})")
            weights = {n: _weight(given.get(n, 0), f"{where}, source {n!r}") for n in names}
        else:
            raise ConfigError(f"{where}: weights must map source names to numbers, got "
                              f"{given!r}")
        decay = item.get("decay")
        if decay is not None and decay not in DECAY_SHAPES:
            raise ConfigError(f"{where}: decay must be one of {'|'.join(DECAY_SHAPES)}, got "
                              f"{decay!r}")
        out.append(Phase(item["name"], start, weights, decay, *_context(item, where)))
    return tuple(out)


def _context(item: dict[str, Any], where: str) -> tuple[Any, Any, Any]:
    sizes = []
    for key in ("block_size", "global_batch_size"):
        v = item.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {v!r}")
        sizes.append(v)
    rope = item.get("rope_parameters")
    if rope is not None and not (isinstance(rope, dict) and rope.get("rope_type")):
        raise ConfigError(f"{where}: rope_parameters must be a mapping with a rope_type, as in "
                          f"the model config (docs/model.md), got {rope!r}")
    return sizes[0], rope, sizes[1]


def plan_of(run: RunConfig) -> Plan | None:
    """The run's sources and phases, validated (no file is read); None for the one-source run
    of a plain `data_glob` without phases."""
    data, phases = run.data, run.train.phases
    if not data.sources:
        if phases:
            raise ConfigError("phases need named sources: give data.sources (a list of {name, "
                              "data_glob, weight}) instead of data.data_glob")
        return None
    if data.data_glob:
        raise ConfigError("give data.sources or data.data_glob, not both (a single glob is a "
                          "source: {name: main, data_glob: ...})")
    sources = parse_sources(data.sources)
    plan = Plan(sources, parse_phases(phases, sources))
    for p in plan.phases:
        if sum(p.weights.values()) <= 0:
            what = ("the sources' weights are" if not phases
                    else f"the weights of phase {p.name!r} are")
            raise ConfigError(f"{what} all zero: give at least one source a positive weight")
    return plan


def exact_weights(weights: list[float], max_denominator: int = 1 << 16
                  ) -> tuple[list[int], int]:
    """Weights as integer parts a_s of a common denominator D (sum a_s = D): exact for weights
    written as decimals or small fractions (0.7/0.2/0.1 -> 7/2/1 of 10); otherwise rounded to
    D = 2**16 by largest remainder (each within 1/65536 of its weight)."""
    fracs = [Fraction(repr(float(w))) for w in weights]
    total = sum(fracs)
    shares = [f / total for f in fracs]
    d = math.lcm(*(s.denominator for s in shares))
    if d <= max_denominator:
        return [int(s * d) for s in shares], d
    d = max_denominator
    raw = [s * d for s in shares]
    parts = [math.floor(r) for r in raw]
    by_rest = sorted(range(len(raw)), key=lambda i: (-(raw[i] - parts[i]), i))
    for i in by_rest[:d - sum(parts)]:
        parts[i] += 1
    return parts, d
