"""`argonne-ds <command>`: the command-line door to the framework."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path


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
    p.add_argument("--fallback-vocab-size", type=int, default=32_000)
    _add_reading_args(p, "token cache (default for prepare: .argonne_cache)")


def _add_reading_args(p: argparse.ArgumentParser, cache_help: str) -> None:
    """How shards are read and tokenized (prepare, train, eval)."""
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--text-column", default="text")
    p.add_argument("--on-bad-shard", choices=("error", "skip"), default="error")
    p.add_argument("--encoder", choices=("auto", "gigatoken", "tokenizers"), default="auto")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """The model to run: an HF folder or an argonne-ds checkpoint (generate, eval)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="a Hugging Face folder (e.g. from argonne-ds export)")
    src.add_argument("--checkpoint", help="an argonne-ds checkpoint (folder or global_stepN)")


def _prepare(args: argparse.Namespace) -> int:
    if args.tokenizer_path and args.encoder != "tokenizers":
        from argonne_ds.data.encode_worker import prestart

        prestart(args.tokenizer_path)  # gigatoken's process starts up while we load ours
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


def _train(args: argparse.Namespace) -> int:
    import torch

    from argonne_ds.data.loader import DataConfig
    from argonne_ds.trainer import OutOfMemory, TrainConfig, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    data = DataConfig(args.data_glob, tokenizer_path=args.tokenizer_path,
                      cache_dir=args.cache_dir, text_column=args.text_column,
                      block_size=args.block_size, seed=args.seed,
                      shuffle_window=args.shuffle_window, on_bad_shard=args.on_bad_shard,
                      allow_shard_change=args.allow_shard_change,
                      fallback_vocab_size=args.fallback_vocab_size, encoder=args.encoder)
    cfg = TrainConfig(
        deepspeed_config=args.deepspeed_config, data=data, model=args.model,
        output_dir=args.output_dir, checkpoint_path=args.checkpoint_path,
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, min_learning_rate=args.min_learning_rate,
        warmup_steps=args.warmup_steps, max_steps=args.max_steps, max_tokens=args.max_tokens,
        weight_decay=args.weight_decay, precision=args.precision,
        save_interval=args.save_interval, checkpoint_keep=args.checkpoint_keep, seed=args.seed,
        log_interval=args.log_interval, eval_interval=args.eval_interval,
        eval_data_glob=args.eval_data_glob or [], eval_batches=args.eval_batches,
        sample_interval=args.sample_interval, sample_prompt=args.sample_prompt,
        sample_tokens=args.sample_tokens, peak_tflops=args.peak_tflops, from_hf=args.from_hf)
    try:
        return train(cfg)
    except OutOfMemory as e:
        print(f"argonne-ds train: error: {e}", file=sys.stderr)
        return 3


def _add_train_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    a = p.add_argument
    a("--model", default="tiny", help="preset name or model config JSON")
    a("--from-hf", help="start from this Hugging Face folder's weights and config (a "
      "checkpoint in --output-dir still takes precedence: resuming wins)")
    a("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
      help="DeepSpeed JSON (ds_configs/): its sections pick pipeline or ZeRO-3")
    a("--block-size", type=int, default=4096, help="tokens per sample (capped at the context)")
    a("--shuffle-window", type=int, default=0, help="shuffle block order within windows")
    a("--allow-shard-change", action="store_true",
      help="resume even though the shard list changed since the checkpoint")
    a("--batch-size", type=int, help="micro-batch per GPU (overrides the JSON)")
    a("--gradient-accumulation-steps", type=int, help="overrides the JSON")
    a("--learning-rate", type=float, default=3e-4)
    a("--min-learning-rate", type=float, default=3e-5)
    a("--warmup-steps", type=int, default=2000)
    a("--max-steps", type=int)
    a("--max-tokens", type=int, help="token budget instead of --max-steps")
    a("--weight-decay", type=float, default=0.1, help="on matrices; none on norms/embeddings")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32")
    a("--output-dir", default="runs/argonne")
    a("--checkpoint-path", help="resume from this checkpoint (folder or global_stepN)")
    a("--save-interval", type=int, default=1000)
    a("--checkpoint-keep", type=int, default=3)
    a("--seed", type=int, default=1234)
    a("--log-interval", type=int, default=10)
    a("--eval-interval", type=int, default=0)
    a("--eval-data-glob", nargs="+", help="held-out shards for --eval-interval")
    a("--eval-batches", type=int, default=4)
    a("--sample-interval", type=int, default=0)
    a("--sample-prompt", default="The")
    a("--sample-tokens", type=int, default=32)
    a("--peak-tflops", type=float, help="MFU denominator (default: from the GPU name)")


def _export(args: argparse.Namespace) -> int:
    from argonne_ds.convert.export import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"[export] {args.checkpoint} -> {out} ({args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from argonne_ds.generate import SamplingConfig, generate_text, load_for_generation

    prompts = list(args.prompt or [])
    if args.prompt_file:
        text = Path(args.prompt_file).read_text()
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    model, tok = load_for_generation(args.model_path, args.checkpoint)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                              seed=args.seed)
    outputs = generate_text(model, tok, prompts, sampling, args.batch_size)
    if args.json:
        print(json.dumps([{"prompt": p, "completion": c} for p, c in zip(prompts, outputs)],
                         indent=1))
    else:
        for p, c in zip(prompts, outputs):
            print(f"{p}{c}\n---")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from argonne_ds.data.loader import DataConfig
    from argonne_ds.evaluate import evaluate
    from argonne_ds.generate import load_for_generation

    model, tok = load_for_generation(args.model_path, args.checkpoint)
    data = DataConfig(args.data_glob, tokenizer_path=tok.name_or_path, cache_dir=args.cache_dir,
                      text_column=args.text_column, on_bad_shard=args.on_bad_shard,
                      block_size=min(args.block_size, model.config.max_position_embeddings),
                      encoder=args.encoder)
    result = evaluate(model, data, args.batch_size, args.max_batches,
                      show_progress=not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"[eval] loss {result['loss']:.4f} | perplexity {result['perplexity']:,.2f} | "
              f"{result['tokens']:,} tokens in {result['blocks']:,} blocks of "
              f"{result['block_size']} | {result['tokens_per_s']:,.0f} tok/s")
    return 0


def _import_original(args: argparse.Namespace) -> int:
    from argonne_ds.convert.original import import_original

    out = import_original(args.checkpoint, args.out, model=args.model, dtype=args.dtype)
    meta = json.loads((out / "argonne_import.json").read_text())
    print(f"[import] {args.checkpoint} -> {out}: step {meta['step']}, {meta['tokens']:,} tokens; "
          f"data position {meta.get('data_position')}; continue with: argonne-ds train "
          f"--from-hf {out} --tokenizer-path TOKENIZER --cache-dir ... on the same shards (the "
          "position is translated at the start)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="argonne-ds", description=__doc__)
    # The deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK is in the env.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help=argparse.SUPPRESS)
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

    p = sub.add_parser("export", help="DeepSpeed checkpoint -> Hugging Face folder")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoints folder (newest complete) or one global_stepN folder")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", help="continue prompts with a trained model")
    _add_model_source(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="loss and perplexity on held-out shards")
    _add_model_source(p)
    p.add_argument("--data-glob", nargs="+", required=True, help="held-out parquet shards")
    _add_reading_args(p, "token cache (default: tokenize while streaming)")
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, help="stop after this many batches")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)

    p = sub.add_parser("import-original",
                       help="an original Argonne 2.0 .pth checkpoint -> a folder train resumes")
    p.add_argument("--checkpoint", required=True, help="the original FILE.pth")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="argonne2-orig", help="its model config (preset or JSON)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    p.set_defaults(func=_import_original)

    p = sub.add_parser("train", help="train under DeepSpeed (run it with the deepspeed launcher)")
    _add_train_args(p)
    p.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from argonne_ds.data import DataError

    # One voice per job: ranks other than 0 log warnings and errors only.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="[%(name)s] %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    clean = True
    try:
        code = int(args.func(args))
    except (FileNotFoundError, PermissionError, ValueError, DataError) as e:
        # One line, even when pyarrow's or the OS's message spans several.
        print(f"argonne-ds {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        code, clean = 2, False
    except BaseException:
        if not _distributed():
            raise
        traceback.print_exc()
        code, clean = 1, False
    if _distributed():
        from argonne_ds.engine import shutdown

        shutdown(code, clean)
    return code


def _distributed() -> bool:
    """Whether this process joined a process group (without importing torch for commands
    that never do)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


if __name__ == "__main__":
    sys.exit(main())
