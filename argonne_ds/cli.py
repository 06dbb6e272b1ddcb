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


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data flags shared by prepare and train."""
    p.add_argument("--data-glob", nargs="+", required=True,
                   help="parquet shards: one or more globs (quoted), read in natural order")
    p.add_argument("--tokenizer-path", help="local HF tokenizer folder (default: train a "
                   "byte-level BPE on the data and keep it beside the cache)")
    p.add_argument("--cache-dir", help="token cache (default for prepare: .argonne_cache)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--on-bad-shard", choices=("error", "skip"), default="error")
    p.add_argument("--fallback-vocab-size", type=int, default=32_000)
    p.add_argument("--encoder", choices=("auto", "gigatoken", "tokenizers"), default="auto")


def _prepare(args: argparse.Namespace) -> int:
    from argonne_ds.data.cache import prepare_cache
    from argonne_ds.data.discovery import describe_plan, discover_shards
    from argonne_ds.data.loader import DEFAULT_TOKENIZER_DIR, DataConfig, resolve_tokenizer

    cfg = DataConfig(args.data_glob, tokenizer_path=args.tokenizer_path,
                     cache_dir=args.cache_dir or DEFAULT_TOKENIZER_DIR,
                     text_column=args.text_column, on_bad_shard=args.on_bad_shard,
                     fallback_vocab_size=args.fallback_vocab_size, encoder=args.encoder)
    shards = discover_shards(cfg.data_glob)
    print(f"[prepare] {describe_plan(shards)}", flush=True)
    tok = resolve_tokenizer(cfg, shards)
    print(f"[prepare] tokenizer {tok.path} ({tok.vocab_size:,} ids, separator "
          f"{tok.separator!r} = {tok.separator_id})", flush=True)
    index = prepare_cache(shards, tok, cfg.cache_dir, cfg.text_column, cfg.on_bad_shard,
                          cfg.encoder, show_progress=not args.no_progress)
    s = index.stats
    rate = f", {s['tokens_per_s'] / 1e6:.1f} M tok/s" if s["tokens_per_s"] else ""
    print(f"[prepare] {s['shards']} shards ({s['tokenized_now']} tokenized now{rate}, "
          f"{s['bad_shards_skipped']} bad skipped): {s['docs']:,} documents, "
          f"{s['empty_docs_skipped']:,} empty skipped, {s['tokens']:,} tokens -> {cfg.cache_dir}")
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

    p = sub.add_parser("prepare", help="tokenize parquet shards once into the token cache")
    add_data_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from argonne_ds.data import DataError

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError, DataError) as e:
        print(f"argonne-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
