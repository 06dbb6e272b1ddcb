"""`argonne-ds <command>`: the command-line door to the framework."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from argonne_ds.run_config import DEFAULT_CACHE_DIR, SECTIONS, DataConfig
from argonne_ds.run_options import add_flags, given


def _model_info(args: argparse.Namespace) -> int:
    from argonne_ds.config import load_model_config
    from argonne_ds.engine.ds_config import read_ds_config
    from argonne_ds.model.info import format_model_info, model_info
    from argonne_ds.model.memory import format_memory_report, memory_report

    source = args.config or args.preset
    config = load_model_config(source)
    gpus = args.gpus or ([8] if args.ds_config else [1, 2, 4, 8, 16])
    seq = args.block_size or config.max_position_embeddings
    info = model_info(config, gpus)
    if any(1 < n <= config.num_hidden_layers + 3 for n in gpus):
        from argonne_ds.model.pipe import partition_report  # imports deepspeed

        info["partition"] = [partition_report(config, n, seq) for n in gpus
                             if 1 < n <= config.num_hidden_layers + 3]
    if args.ds_config:
        ds = read_ds_config(args.ds_config)
        info["plans"] = {str(n): memory_report(config, ds, n, seq, args.gpu_memory)
                         for n in gpus}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_model_info(source, info))
    for report in info.get("plans", {}).values():
        print(format_memory_report(f"{source} with {args.ds_config}", report))
    if args.longest_context:
        from argonne_ds.model.memory import format_longest_context

        where = args.ds_config or "ds_configs/zero3.json"
        print(format_longest_context(f"{source} with {where}", config, read_ds_config(where),
                                     args.gpus or [8, 16, 32, 64], args.gpu_memory))
    return 0


PREPARE_DATA = ("data_glob", "tokenizer_path", "fallback_vocab_size", "cache_dir", "text_column",
                "on_bad_shard", "encoder")
EVAL_DATA = ("data_glob", "cache_dir", "text_column", "on_bad_shard", "encoder", "block_size")


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="RUN.yaml", help="a run config (YAML or JSON; examples in "
                   "launch/configs/): every option a key, flags given here override it")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """The model to run: an HF folder or an argonne-ds checkpoint (generate, eval)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="a Hugging Face folder (e.g. from argonne-ds export)")
    src.add_argument("--checkpoint", help="an argonne-ds checkpoint (folder or global_stepN)")
    p.add_argument("--device", default="auto",
                   help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on a GPU that supports it, else fp32")


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle the file fully, which runs any code it names: only for a file "
                   "whose maker you trust (default: tensors, numbers, strings, lists, dicts)")


def _prepare(args: argparse.Namespace) -> int:
    from argonne_ds.run_options import load_file

    values = {**load_file(args.config)["data"], **given(args, DataConfig)} if args.config \
        else given(args, DataConfig)
    cfg = DataConfig(**{"cache_dir": DEFAULT_CACHE_DIR, **{k: v for k, v in values.items()
                                                         if v is not None}})
    if cfg.sources:
        return _prepare_sources(cfg, args)
    if not cfg.data_glob:
        raise ValueError("give --data-glob (or data.data_glob or data.sources in --config)")
    if cfg.tokenizer_path and cfg.encoder != "tokenizers":
        from argonne_ds.data.encode_worker import prestart

        prestart(cfg.tokenizer_path)  # gigatoken's process starts up while we load ours
    from argonne_ds.data.cache import prepare_cache
    from argonne_ds.data.discovery import describe_plan, discover_shards
    from argonne_ds.data.loader import resolve_tokenizer

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


def _prepare_sources(cfg: DataConfig, args: argparse.Namespace) -> int:
    """`prepare --config` of a run with data.sources: one tokenizer (trained on all of them
    without one), every source's shards (and held-out shards) cached."""
    from argonne_ds.data.cache import prepare_cache
    from argonne_ds.data.discovery import describe_plan, discover_shards
    from argonne_ds.data.loader import resolve_tokenizer, source_shards
    from argonne_ds.phases import Plan, parse_sources

    sources = parse_sources(cfg.sources)
    by_source = source_shards(Plan(sources, ()))
    tok = resolve_tokenizer(cfg, [s for shards in by_source.values() for s in shards])
    print(f"[prepare] tokenizer {tok.path} ({tok.vocab_size:,} ids, separator "
          f"{tok.separator!r} = {tok.separator_id})", flush=True)
    for source in sources:
        column = source.text_column or cfg.text_column
        parts = [("", by_source[source.name])]
        if source.eval_data_glob:
            parts.append((" held-out", discover_shards(list(source.eval_data_glob))))
        for what, shards in parts:
            print(f"[prepare] source {source.name}{what}: {describe_plan(shards)}", flush=True)
            index = prepare_cache(shards, tok, cfg.cache_dir, column, cfg.on_bad_shard,
                                  cfg.encoder, show_progress=not args.no_progress)
            print(f"[prepare] source {source.name}{what}: {index.stats['tokens']:,} tokens "
                  f"-> {cfg.cache_dir}", flush=True)
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from argonne_ds.run_options import resolve_run_config
    from argonne_ds.trainer import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    return train(resolve_run_config(args))


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_arg(p)
    for cls in SECTIONS.values():
        add_flags(p, cls)


def _export(args: argparse.Namespace) -> int:
    from argonne_ds.convert.export import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype, trust=args.trust_pickle)
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
    model, tok = load_for_generation(args.model_path, args.checkpoint, args.device, args.dtype)
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
    from argonne_ds.evaluate import evaluate
    from argonne_ds.generate import load_for_generation

    if not args.probe and not args.data_glob:
        raise ValueError("eval needs --data-glob (held-out shards) or --probe retrieval")
    model, tok = load_for_generation(args.model_path, args.checkpoint, args.device, args.dtype)
    if args.probe:
        return _probe(args, model, tok)
    data = DataConfig(**given(args, DataConfig), tokenizer_path=tok.name_or_path)
    data.block_size = min(data.block_size, model.config.max_position_embeddings)
    result = evaluate(model, data, args.batch_size, args.max_batches,
                      show_progress=not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"[eval] loss {result['loss']:.4f} | perplexity {result['perplexity']:,.2f} | "
              f"{result['tokens']:,} tokens in {result['blocks']:,} blocks of "
              f"{result['block_size']} | {result['tokens_per_s']:,.0f} tok/s on "
              f"{result['device']} in {result['dtype']}")
        print("[eval] loss by position: " + " | ".join(
            f"{k} {v:.4f}" for k, v in result["by_position"].items()))
    return 0


def _probe(args: argparse.Namespace, model: Any, tok: Any) -> int:
    from argonne_ds.generate import SamplingConfig, generate_text
    from argonne_ds.probe import retrieval_probe

    longest = max(args.probe_lengths) + 12
    if longest > model.config.max_position_embeddings and model.config.rope_type != "dynamic":
        raise ValueError(f"--probe-lengths {max(args.probe_lengths)} (+12 answer tokens) exceeds "
                         f"the model's context ({model.config.max_position_embeddings})")
    sampling = SamplingConfig(max_new_tokens=12, greedy=True)
    result = retrieval_probe(
        lambda prompts: generate_text(model, tok, prompts, sampling, args.batch_size),
        lambda text: tok(text, add_special_tokens=False)["input_ids"], args.probe_lengths,
        args.probe_depths, args.probe_samples)
    if args.json:
        print(json.dumps({"probe": "retrieval", "accuracy": result}, indent=1))
    else:
        print("[probe] retrieval accuracy (length@depth): " + " | ".join(
            f"{k} {v:.2f}" for k, v in result.items()))
    return 0


def _import_original(args: argparse.Namespace) -> int:
    from argonne_ds.convert.original import import_original

    out = import_original(args.checkpoint, args.out, model=args.model, dtype=args.dtype,
                          trust=args.trust_pickle)
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
    p.add_argument("--gpus", type=int, nargs="+", default=None,
                   help="GPU counts (pipeline stages / ZeRO-3 ranks) to plan for")
    p.add_argument("--ds-config", metavar="JSON",
                   help="a DeepSpeed JSON: plan its memory per GPU (activations included)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per sample (default: the model's context length)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="memory of one GPU in GiB for the plan (default 80)")
    p.add_argument("--longest-context", action="store_true",
                   help="the longest sequence that fits per GPU count and sequence-parallel "
                   "degree (with --ds-config, default ds_configs/zero3.json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_model_info)

    p = sub.add_parser("prepare", help="tokenize parquet shards once into the token cache")
    _add_config_arg(p)
    add_flags(p, DataConfig, only=PREPARE_DATA, help_defaults={"cache_dir": DEFAULT_CACHE_DIR})
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("export", help="DeepSpeed checkpoint -> Hugging Face folder")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoints folder (newest complete) or one global_stepN folder")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    _add_trust_flag(p)
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

    p = sub.add_parser("eval", help="loss and perplexity on held-out shards (by position too), "
                       "or a synthetic retrieval probe")
    _add_model_source(p)
    add_flags(p, DataConfig, only=EVAL_DATA)
    p.add_argument("--probe", choices=("retrieval",),
                   help="instead of held-out shards: a key planted at depths of a long "
                   "distractor text (probe.py)")
    p.add_argument("--probe-lengths", type=int, nargs="+", default=[1024],
                   metavar="TOKENS")
    p.add_argument("--probe-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--probe-samples", type=int, default=4, help="prompts per length and depth")
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
    _add_trust_flag(p)
    p.set_defaults(func=_import_original)

    p = sub.add_parser("train", help="train under DeepSpeed (run it with the deepspeed launcher)")
    _add_train_args(p)
    p.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from argonne_ds.data import DataError
    from argonne_ds.reliability.exits import Exit, JobError

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
        code, clean = Exit.BAD_INPUT, False
    except JobError as e:  # the job cannot go on (out of memory, bad steps): its exit code says
        if not e.everywhere or os.environ.get("RANK", "0") == "0":
            what = "" if e.code == Exit.NEXT_PHASE else "error: "  # a planned stop
            print(f"argonne-ds {args.command}: {what}{e}", file=sys.stderr, flush=True)
        code, clean = e.code, e.code == Exit.NEXT_PHASE
    except BaseException as e:
        if not _distributed():
            raise
        if _lost_peer(e):  # the peer's own error says why; a traceback here would bury it
            print(f"argonne-ds {args.command}: error: rank {os.environ.get('RANK', '?')} lost "
                  f"another rank mid-collective ({' '.join(str(e).split())[-160:]}); that "
                  "rank's error above is the cause", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        code, clean = Exit.CRASH, False
    if _distributed():
        from argonne_ds.engine.distributed import shutdown

        shutdown(code, clean)
    return code


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank went away (gloo/NCCL say so)."""
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                   "remote worker crashing", "NCCL communicator was aborted"))


def _distributed() -> bool:
    """Whether this process joined a process group (without importing torch for commands
    that never do)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


if __name__ == "__main__":
    sys.exit(main())
