"""`argonne-ds <command>`: the command-line door to the framework."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _model_info(args: argparse.Namespace) -> int:
    from argonne_ds.config import load_model_config
    from argonne_ds.model.info import format_model_info, model_info

    source = args.config or args.preset
    config = load_model_config(source)
    info = model_info(config, args.gpus)
    print(json.dumps(info, indent=2) if args.json else format_model_info(source, info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="argonne-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model-info", help="config, parameter count and training memory per GPU")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="argonne2",
                     help="preset name (argonne2, argonne2-orig, argonne2-1b, tiny)")
    src.add_argument("--config", help="model config JSON (or a directory with config.json)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="GPU counts (pipeline stages / ZeRO-3 ranks) to plan for")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_model_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as e:
        print(f"argonne-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
