"""The run config's values from where a person writes them: the command line (one flag per
option, generated from run_config.py's declarations) and a YAML/JSON `--config` file; defaults <
file < flags, each value's origin recorded for the notes that name it."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from argonne_ds.run_config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    coerce,
    field_type,
    options_of,
    parse_int,
)

# ---- flags --------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None,
              required: tuple[str, ...] = (), help_defaults: dict[str, Any] | None = None
              ) -> None:
    """One flag per option of `cls` (all, or `only`). Flags default to "not given"
    (argparse.SUPPRESS) so that a run config file's value is not overwritten by a default."""
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower() or "options")
    for f in options_of(cls):
        if (only is not None and f.name not in only) or f.metadata.get("file_only"):
            continue
        meta = f.metadata
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        kind, is_list = field_type(cls, f.name)
        shown = (help_defaults or {}).get(f.name, f.default if f.default is not
                                          dataclasses.MISSING else f.default_factory())
        text = meta["help"] + ("" if shown in (None, [], "") else f" (default: {shown})")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text,
                              "required": f.name in required}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = parse_int if kind is int else kind
            if is_list:
                kw["nargs"] = "+"
            if meta["choices"]:
                kw["choices"] = meta["choices"]
        if meta["consts"]:
            excl = group.add_mutually_exclusive_group()
            excl.add_argument(*flags, **kw)
            for switch, const in meta["consts"].items():
                excl.add_argument(switch, dest=f.name, action="store_const", const=const,
                                  default=argparse.SUPPRESS, help=f"same as {flags[0]} {const}")
        else:
            group.add_argument(*flags, **kw)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of `cls` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in options_of(cls) if hasattr(args, f.name)}


# ---- files --------------------------------------------------------------------------------------


def load_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """A YAML or JSON run config -> {section: {option: value}}, typed. Sections (`data:`,
    `train:`, ...) or flat keys named like the flags (`learning-rate` or `learning_rate`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {path} does not exist; see launch/configs/ for examples")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise different errors
        raise ConfigError(f"run config {path} does not parse: {' '.join(str(e).split())}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {path}: expected a mapping of options, got "
                          f"{type(raw).__name__}")
    return sectioned(raw, str(path))


def sectioned(raw: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    owner = {f.name: s for s, cls in SECTIONS.items() for f in options_of(cls)}
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}

    def put(key: str, value: Any, section: str | None) -> None:
        name = key.replace("-", "_")
        if name not in owner or (section is not None and owner[name] != section):
            known = sorted(owner) if section is None else sorted(
                f.name for f in options_of(SECTIONS[section]))
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{where}: unknown option {(section + '.') if section else ''}"
                              f"{key}{hint} (`argonne-ds train --help` lists them)")
        out[owner[name]][name] = coerce(SECTIONS[owner[name]], name, value, where)

    for key, value in raw.items():
        if key == "phases":  # the run's phases: a top-level list (kept in train)
            put(key, value, "train")
        elif key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                put(k, v, key)
        else:
            put(key, value, None)
    return out


def resolve_run_config(args: argparse.Namespace) -> RunConfig:
    """Defaults < the `--config` file < flags given on the command line; validated."""
    path = getattr(args, "config", None)
    from_file = load_file(path) if path else {}
    flags = {s: given(args, cls) for s, cls in SECTIONS.items()}
    run = RunConfig(**{s: cls(**{**from_file.get(s, {}), **flags[s]})
                       for s, cls in SECTIONS.items()})
    run.sources = {name: f"{s}.{name} in {path}" for s, values in from_file.items()
                   for name in values}
    run.sources |= {name: _flag(SECTIONS[s], name) for s, values in flags.items()
                    for name in values}
    return run.validate()


def _flag(cls: type, name: str) -> str:
    f = next(f for f in options_of(cls) if f.name == name)
    return (f.metadata["flags"] or ("--" + name.replace("_", "-"),))[0]


def from_dict(raw: dict[str, Any], where: str = "run config") -> RunConfig:
    parts = sectioned(raw, where)
    return RunConfig(**{s: cls(**parts[s]) for s, cls in SECTIONS.items()})
