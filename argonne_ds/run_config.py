"""The run config: one typed dataclass per concern, each option declared once.

    DataConfig        what is read and how it is packed          (section `data:`)
    TrainConfig       model, engine JSON, batch, optimizer, budget (section `train:`)
    CheckpointConfig  where runs live, how often they are saved  (section `checkpoint:`)
    LogConfig         what the job reports while it runs         (section `log:`)
    ReliabilityConfig bad steps skipped, hangs timed out          (section `reliability:`)
    RunConfig         the five together, validated as a whole

A field's default, help text and flag live in its declaration (`option(...)`); `add_flags`
generates the argparse flags from them, `load_file` reads a YAML or JSON run config (sections, or
flat keys named like the flags), and `resolve_run_config` merges defaults < file < flags given on
the command line. Each option also says what changing it between a checkpoint and its resume
means (`on_resume`): "refuse" (the saved data position would point at other data), "warn" (the run
continues, differently from here on) or "note". No torch, transformers or DeepSpeed import here:
`prepare` and `--help` stay fast.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_CACHE_DIR = ".argonne_cache"


class ConfigError(ValueError):
    """A configuration the framework cannot use, phrased for the user (the CLI prints one line)."""


def option(default: Any, help: str, *, flags: tuple[str, ...] = (), choices: tuple = (),
           consts: dict[str, Any] | None = None, cli: bool = True, on_resume: str = "note",
           file_only: bool = False) -> Any:
    """A dataclass field with its flag metadata. `flags`: the spellings (default `--the-name`);
    `consts`: extra switches that set a fixed value (`--bf16` -> precision "bf16"); `cli=False`:
    set by the code, not a user option; `file_only`: a structured option (a list of mappings)
    that only a --config file sets."""
    meta = {"help": help, "flags": flags, "choices": choices, "consts": consts or {}, "cli": cli,
            "on_resume": on_resume, "file_only": file_only}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    data_glob: list[str] = option(
        [], "parquet shards: one or more globs (quoted), read in natural order")
    sources: list[dict] = option(
        [], "named sources blended by weight (a --config file's data.sources: a list of {name, "
        "data_glob, weight, text_column, eval_data_glob}; see phases.py)", file_only=True)
    max_repeats: float = option(
        4.0, "warn when the plan reads a source more than this many times over the budget")
    tokenizer_path: str | None = option(
        None, "local HF tokenizer folder (default: train a byte-level BPE on the data and keep "
        "it beside the cache)")
    cache_dir: str | None = option(
        None, "token cache folder (train and eval without one: tokenize while streaming)")
    text_column: str = option("text", "the parquet column holding the documents",
                              on_resume="refuse")
    block_size: int = option(4096, "tokens per sample (capped at the model's context)",
                             on_resume="refuse")
    shuffle_window: int = option(0, "shuffle block order within windows of this many blocks "
                                 "(0: natural order)", on_resume="refuse")
    on_bad_shard: str = option("error", "a bad shard stops the job, or is skipped and counted",
                               choices=("error", "skip"))
    allow_shard_change: bool = option(
        False, "resume even though the shard list changed since the checkpoint")
    fallback_vocab_size: int = option(32_000, "vocabulary of the fallback BPE")
    encoder: str = option("auto", "tokenizer implementation (identical ids)",
                          choices=("auto", "gigatoken", "tokenizers"))
    seed: int = option(1234, "shuffle seed: the run's --seed", cli=False, on_resume="refuse")

    def __post_init__(self) -> None:
        if isinstance(self.data_glob, str):
            self.data_glob = [self.data_glob]
        if self.block_size < 1:
            raise ConfigError(f"data.block_size must be positive, got {self.block_size}")
        if self.shuffle_window < 0:
            raise ConfigError(f"data.shuffle_window must be >= 0, got {self.shuffle_window}")
        _check_choices(self)


@dataclass
class TrainConfig:
    deepspeed_config: str | None = option(
        None, "DeepSpeed JSON (ds_configs/): its sections pick pipeline or ZeRO-3",
        flags=("--deepspeed_config", "--deepspeed-config"))
    model: str = option("tiny", "preset name or model config JSON")
    from_hf: str | None = option(
        None, "start from this Hugging Face folder's weights and config (a checkpoint in "
        "--output-dir still takes precedence: resuming wins)")
    global_batch_size: int | None = option(
        None, "samples per optimizer step over all ranks (default: the JSON's train_batch_size, "
        "else its micro-batch x accumulation x data-parallel ranks); gradient accumulation is "
        "derived for the layout at hand, so swapping the JSON keeps it")
    batch_size: int | None = option(None, "micro-batch per GPU (overrides the JSON)")
    gradient_accumulation_steps: int | None = option(
        None, "fixes accumulation instead (the global batch then follows the rank count)")
    sequence_parallel_size: int | None = option(
        None, "ranks that share each sequence (DeepSpeed Ulysses; overrides the JSON's "
        "sequence_parallel_size; ZeRO-3 or data parallel)")
    allow_global_batch_change: bool = option(
        False, "resume although the global batch differs from the checkpoint's (the data "
        "continues at the same sample, the LR schedule at the same step)")
    learning_rate: float = option(3e-4, "peak learning rate", on_resume="warn")
    min_learning_rate: float = option(3e-5, "learning rate at the start of warmup and at the end",
                                      on_resume="warn")
    warmup_steps: int = option(2000, "linear warmup steps", on_resume="warn")
    lr_schedule: str = option(
        "cosine", "cosine (warmup, then cosine to the floor over the budget) or wsd "
        "(warmup-stable-decay: the peak until the decay, then down to the floor; a phase with "
        "`decay:` places it)", choices=("cosine", "wsd"), on_resume="warn")
    decay_shape: str = option("1-sqrt", "wsd: the decay's shape",
                              choices=("linear", "cosine", "1-sqrt"), on_resume="warn")
    decay_steps: int | None = option(None, "wsd without a decay phase: the last this many steps "
                                     "decay", on_resume="warn")
    decay_fraction: float = option(0.2, "wsd without a decay phase or --decay-steps: this "
                                   "fraction of the budget decays", on_resume="warn")
    phases: list[dict] = option(
        [], "the run's phases (a --config file's top-level `phases:`: a list of {name, start, "
        "weights, decay}; see phases.py)", file_only=True)
    max_steps: int | None = option(None, "optimizer steps to train (or --max-tokens)",
                                   on_resume="warn")
    max_tokens: int | None = option(None, "token budget instead of --max-steps", on_resume="warn")
    weight_decay: float = option(0.1, "on matrices; none on norms/embeddings", on_resume="warn")
    precision: str | None = option(
        None, "bf16 | fp16 | fp32 (default: the JSON's)", choices=("bf16", "fp16", "fp32"),
        consts={"--bf16": "bf16", "--fp16": "fp16", "--fp32": "fp32"}, on_resume="warn")
    seed: int = option(1234, "seed of the initial weights and of the data shuffle",
                       on_resume="refuse")
    min_micro_batch_size: int = option(1, "the out-of-memory backoff stops at this micro-batch")

    def __post_init__(self) -> None:
        _check_choices(self)
        for name in ("global_batch_size", "batch_size", "gradient_accumulation_steps",
                     "max_steps", "max_tokens", "min_micro_batch_size",
                     "sequence_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} must be positive, got {value}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.decay_steps is not None and self.decay_steps < 0:
            raise ConfigError(f"train.decay_steps must be >= 0, got {self.decay_steps}")
        if self.learning_rate <= 0 or not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(f"need 0 <= train.min_learning_rate ({self.min_learning_rate}) <= "
                              f"train.learning_rate ({self.learning_rate}), learning_rate > 0")


@dataclass
class CheckpointConfig:
    output_dir: str = option("runs/argonne", "checkpoints (resumed from automatically), "
                             "metrics, the resolved run config")
    checkpoint_path: str | None = option(
        None, "resume from this checkpoint: a run directory, its checkpoints folder or one "
        "global_stepN")
    save_interval: int = option(1000, "save every this many steps (and at the end)")
    checkpoint_keep: int = option(3, "keep the newest this many complete checkpoints (0: all)")
    async_save: bool = option(
        True, "write checkpoint files in the background: the loop waits only while the state "
        "is copied off the device (the save at the end or on a stop signal is written at once)")

    def __post_init__(self) -> None:
        if self.save_interval < 1 or self.checkpoint_keep < 0:
            raise ConfigError(f"need checkpoint.save_interval >= 1 and checkpoint_keep >= 0, got "
                              f"{self.save_interval} and {self.checkpoint_keep}")


@dataclass
class LogConfig:
    log_interval: int = option(10, "print a progress line every this many steps")
    eval_interval: int = option(0, "held-out loss every this many steps (0: never)")
    eval_data_glob: list[str] = option([], "held-out shards for --eval-interval")
    eval_batches: int = option(4, "held-out micro-batches per evaluation")
    sample_interval: int = option(0, "a greedy sample every this many steps (0: never)")
    sample_prompt: str = option("The", "the sample's prompt")
    sample_tokens: int = option(32, "tokens per sample")
    peak_tflops: float | None = option(None, "MFU denominator (default: from the GPU name)")

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"log.log_interval must be >= 1, got {self.log_interval}")


@dataclass
class ReliabilityConfig:
    skip_sigma: float = option(
        6.0, "skip a step whose loss or gradient norm is this many standard deviations above "
        "the mean of the last --skip-window steps (0: skip only non-finite ones)",
        on_resume="warn")
    skip_window: int = option(128, "steps in --skip-sigma's rolling window (judged from half)",
                              on_resume="warn")
    max_skips_in_a_row: int = option(8, "stop (exit 4) after this many skipped steps in a row")
    skip_steps: list[str] = option(
        [], "steps to skip on purpose, e.g. 1201-1250 1307: their data is consumed, the weights "
        "are not updated (to train past bad data)", on_resume="warn")
    step_timeout: float | None = option(
        None, "seconds a step may take before every rank's stack is printed and the job exits "
        "75 for launch/train.sh to relaunch (default: 10x the median step, at least 300; 0: "
        "off)")

    def __post_init__(self) -> None:
        if self.skip_sigma < 0 or self.skip_window < 2 or self.max_skips_in_a_row < 1:
            raise ConfigError("need reliability.skip_sigma >= 0, skip_window >= 2 and "
                              f"max_skips_in_a_row >= 1, got {self.skip_sigma}, "
                              f"{self.skip_window} and {self.max_skips_in_a_row}")
        if self.step_timeout is not None and self.step_timeout < 0:
            raise ConfigError(f"reliability.step_timeout must be >= 0, got {self.step_timeout}")
        from argonne_ds.reliability.guard import parse_steps

        try:
            parse_steps(self.skip_steps)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)

    def __post_init__(self) -> None:
        self.data.seed = self.train.seed  # one --seed: weights and data shuffle
        # Where each option's value came from (run_options.resolve_run_config), for the notes;
        # not a field: not written, not compared on resume.
        self.sources: dict[str, str] = {}

    def origin(self, name: str) -> str:
        """Where option `name` was set: its flag, `section.name in FILE`, or "run config"."""
        return self.sources.get(name, "run config")

    def validate(self) -> RunConfig:
        """What a training run needs beyond each section's own checks."""
        if not self.data.data_glob and not self.data.sources:
            raise ConfigError("give --data-glob (or data.data_glob or data.sources in --config)")
        if not self.train.deepspeed_config:
            raise ConfigError("give --deepspeed_config (or train.deepspeed_config in --config); "
                              "see ds_configs/")
        if self.train.max_steps is None and self.train.max_tokens is None:
            raise ConfigError("give --max-steps or --max-tokens")
        if self.log.eval_interval and not self.log.eval_data_glob and not any(
                isinstance(s, dict) and s.get("eval_data_glob") for s in self.data.sources):
            raise ConfigError("--eval-interval needs --eval-data-glob (the held-out shards) or "
                              "a source's eval_data_glob")
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: _public(getattr(self, s.name)) for s in fields(self)}

    def flat(self) -> dict[str, Any]:
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    def write(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(
            "# argonne-ds run config, as resolved (defaults < --config file < flags); rerun "
            "with\n# `argonne-ds train --config THIS_FILE`\n"
            + yaml.safe_dump(self.to_dict(), sort_keys=False, width=100))


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(RunConfig)}  # type: ignore


def options_of(cls: type) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def _public(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in options_of(type(obj))}


def _check_choices(obj: Any) -> None:
    section = type(obj).__name__.removesuffix("Config").lower()
    for f in fields(obj):
        allowed, value = f.metadata.get("choices"), getattr(obj, f.name)
        if allowed and value is not None and value not in allowed:
            raise ConfigError(f"{section}.{f.name} must be one of {'|'.join(allowed)}, got "
                              f"{value!r}")


def parse_int(text: str) -> int:
    """An int as a person writes a budget: `100000`, `100_000`, `1e11`."""
    value = float(text) if "e" in text.lower() else int(text.replace("_", ""))
    if value != int(value):
        raise ValueError(f"not an integer: {text}")
    return int(value)


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """(the scalar type, whether it is a list) of a field; `X | None` counts as X."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """A value from a file in the field's type (YAML reads `3e-4` as a string)."""
    kind, is_list = field_type(cls, name)
    if value is None:
        return None
    if is_list and kind is dict:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{where}: {name} must be a list of mappings, got {value!r}")
        return [dict(v) for v in value]
    if is_list:
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return parse_int(value) if kind is int and isinstance(value, str) else kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be {kind.__name__}, got {value!r}") from None


# ---- resume -------------------------------------------------------------------------------------


@dataclass
class Change:
    name: str
    before: Any
    after: Any
    kind: str  # refuse | warn | note

    def __str__(self) -> str:
        return f"{self.name} {self.before!r} -> {self.after!r}"


def compare(saved: dict[str, Any], now: RunConfig) -> list[Change]:
    """The options that differ between a checkpoint's run config (sectioned or flat; an older
    checkpoint may lack some options, which are skipped) and this run's."""
    flat_saved: dict[str, Any] = {}
    for key, value in saved.items():
        if key in SECTIONS and isinstance(value, dict):
            flat_saved.update(value)
        else:
            flat_saved[key] = value
    changes = []
    for section, cls in SECTIONS.items():
        for f in options_of(cls):
            if f.name not in flat_saved:
                continue
            before, after = flat_saved[f.name], getattr(getattr(now, section), f.name)
            if before != after:
                changes.append(Change(f"{section}.{f.name}", before, after,
                                      f.metadata["on_resume"]))
    return changes
