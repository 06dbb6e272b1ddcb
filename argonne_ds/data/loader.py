"""From settings to the iterator the engine consumes: discovery, tokenizer, cache or stream."""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from argonne_ds.data import DataError
from argonne_ds.data.cache import build_lock, load_cache
from argonne_ds.data.discovery import describe_plan, discover_shards, shard_list_fingerprint
from argonne_ds.data.shards import no_good_shards_error, open_shard
from argonne_ds.data.tokenizer import (
    LoadedTokenizer,
    fallback_tokenizer_dir,
    load_tokenizer,
    make_encoder,
    train_fallback_tokenizer,
)
from argonne_ds.run_config import DEFAULT_CACHE_DIR, DataConfig

if TYPE_CHECKING:  # stream.py imports torch (~1 s): not on `prepare`'s path
    from argonne_ds.data.layout import PhasedBlocks
    from argonne_ds.data.mixture import Mixture
    from argonne_ds.data.stream import CachedBlocks, ResumableShardIterator, StreamedBlocks
    from argonne_ds.phases import Context, Plan, Source

logger = logging.getLogger(__name__)
DEFAULT_TOKENIZER_DIR = DEFAULT_CACHE_DIR  # the fallback tokenizer lives beside the cache


def resolve_tokenizer(cfg: DataConfig, shards: list, model_vocab_size: int | None = None
                      ) -> LoadedTokenizer:
    path = cfg.tokenizer_path
    if path is None:
        # Under --on-bad-shard skip, sample only shards that open (the skips are reported where
        # the data is read); under error, a bad sampled shard raises as it is read.
        sample = usable_shards(cfg, shards, warn=False) if cfg.on_bad_shard == "skip" else shards
        where = Path(cfg.cache_dir or DEFAULT_TOKENIZER_DIR)
        done = fallback_tokenizer_dir(sample, cfg.text_column, where, cfg.fallback_vocab_size)
        if (done / "tokenizer.json").is_file():  # complete: every rank reads it, no lock
            path = str(done)
        else:  # one process trains it, the others wait for it and then reuse it
            with build_lock(where):
                path = str(train_fallback_tokenizer(sample, cfg.text_column, where,
                                                    vocab_size=cfg.fallback_vocab_size))
    return load_tokenizer(path, model_vocab_size)


def usable_shards(cfg: DataConfig, shards: list, warn: bool = True) -> list:
    """Streaming mode: validate every shard up front (footers only), dropping bad ones under
    --on-bad-shard skip, so problems surface before training, not hours in."""
    good, errors = [], []
    for s in shards:
        try:
            open_shard(s, cfg.text_column)
            good.append(s)
        except DataError as e:
            if cfg.on_bad_shard == "error":
                raise
            errors.append(e)
            if warn:
                logger.warning("skipping bad shard (--on-bad-shard skip): %s", e)
    if errors and not good:
        raise no_good_shards_error(len(shards), errors[0])
    if errors and warn:
        logger.warning("data: %d of %d shards skipped as bad (--on-bad-shard skip)",
                       len(errors), len(shards))
    return good


def source_shards(plan: Plan) -> dict[str, list]:
    """Each source's shards (natural order), checked: a glob that matches nothing and a shard
    in two sources are named before anything is read."""
    out: dict[str, list] = {}
    owner: dict[str, str] = {}
    for source in plan.sources:
        try:
            shards = discover_shards(list(source.data_glob))
        except DataError as e:
            raise DataError(f"source {source.name!r}: {e}") from None
        for shard in shards:
            if shard.path in owner:
                raise DataError(f"sources {owner[shard.path]!r} and {source.name!r} both "
                                f"contain {shard.path}: a shard belongs to one source; narrow "
                                "their data_globs")
            owner[shard.path] = source.name
        out[source.name] = shards
    return out


def build_data_iterator(
    cfg: DataConfig, *, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
    dp_world: int = 1, model_vocab_size: int | None = None, show_progress: bool = True,
    plan: Plan | None = None, contexts: list[Context] | None = None,
) -> tuple[ResumableShardIterator, LoadedTokenizer]:
    """The iterator of one `data_glob`, or with `plan` its sources blended by its phases
    (`contexts`: each phase's block size and global batch, when phases change them)."""
    from argonne_ds.data.stream import ResumableShardIterator

    if plan is not None:
        contexts = contexts or plan.contexts(cfg.block_size, global_batch_size)
        mixture, tok, fingerprint = _build_mixture(cfg, plan, contexts, model_vocab_size,
                                                   show_progress)
        it = ResumableShardIterator(mixture, global_batch_size=global_batch_size,
                                    micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                                    dp_world=dp_world, fingerprint=fingerprint)
        return it, tok
    shards = discover_shards(cfg.data_glob)
    logger.info("data: %s", describe_plan(shards))
    tok = resolve_tokenizer(cfg, shards, model_vocab_size)
    source, shard_list = _blocks(cfg, shards, tok, cfg.text_column, cfg.seed, show_progress)
    fingerprint = {
        "shards": shard_list, "tokenizer": tok.fingerprint,
        "separator": tok.separator_id, "text_column": cfg.text_column,
        "block_size": cfg.block_size, "seed": cfg.seed, "shuffle_window": cfg.shuffle_window,
    }
    it = ResumableShardIterator(source, global_batch_size=global_batch_size,
                                micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                                dp_world=dp_world, fingerprint=fingerprint)
    return it, tok


def _blocks(cfg: DataConfig, shards: list, tok: LoadedTokenizer, text_column: str, seed: int,
            show_progress: bool, resized: list[tuple[int, int]] | None = None
            ) -> tuple[CachedBlocks | StreamedBlocks | PhasedBlocks, str]:
    """One set of shards as blocks (cache or stream), and its shard-list fingerprint.
    `resized`: where phases change the block size, (source sample, block size) from the number
    of the source's blocks (data/layout.py)."""
    from argonne_ds.data.layout import PhasedBlocks
    from argonne_ds.data.stream import CachedBlocks, StreamedBlocks

    if resized is not None and not cfg.cache_dir:
        raise DataError("a phase changes block_size: that needs the token cache (the rest of "
                        "the epoch is re-cut at the new size); run `argonne-ds prepare` and "
                        "pass --cache-dir")
    if cfg.cache_dir:
        # A complete cache: its index, read without a lock (start-up does not grow with ranks).
        index = load_cache(shards, tok, cfg.cache_dir, text_column, cfg.on_bad_shard,
                           cfg.encoder, show_progress=show_progress)
        blocks: CachedBlocks | StreamedBlocks | PhasedBlocks = CachedBlocks(
            index, cfg.block_size, seed, cfg.shuffle_window)
        if resized is not None:
            blocks = PhasedBlocks(blocks.store, resized, seed,
                                  cfg.shuffle_window)
        return blocks, index.shard_list  # = shard_list_fingerprint(shards), checked on load
    column_cfg = dataclasses.replace(cfg, text_column=text_column)
    blocks = StreamedBlocks(usable_shards(column_cfg, shards), text_column,
                            make_encoder(tok, cfg.encoder), cfg.block_size, seed,
                            cfg.shuffle_window, skip_bad=cfg.on_bad_shard == "skip")
    return blocks, shard_list_fingerprint(shards)


def source_seed(seed: int, name: str) -> int:
    """Each source's own shuffle: the run's seed and the source's name."""
    return seed * (1 << 32) + zlib.crc32(name.encode())


def _build_mixture(cfg: DataConfig, plan: Plan, contexts: list[Context],
                   model_vocab_size: int | None, show_progress: bool
                   ) -> tuple[Mixture, LoadedTokenizer, dict]:
    from argonne_ds.data.mixture import Blend, Mixture, Span
    from argonne_ds.phases import exact_weights

    by_source = source_shards(plan)
    for name, shards in by_source.items():
        logger.info("data: source %s: %s", name, describe_plan(shards))
    tok = resolve_tokenizer(cfg, [s for shards in by_source.values() for s in shards],
                            model_vocab_size)
    spans = [Span(p.name, c.start_sample,
                  tuple(exact_weights([p.weights[n] for n in plan.names])[0]))
             for p, c in zip(plan.phases, contexts)]
    blend = Blend(spans)
    sizes = [c.block_size for c in contexts]
    blocks, lists = [], {}
    for i, source in enumerate(plan.sources):
        column = _column(cfg, source)
        resized = None  # the source's block count at each phase's start, and its block size
        if len(set(sizes)) > 1:
            resized = [(int(blend.counts(c.start_sample)[i]), c.block_size) for c in contexts]
        b, shard_list = _blocks(cfg, by_source[source.name], tok, column,
                                source_seed(cfg.seed, source.name), show_progress, resized)
        blocks.append(b)
        lists[source.name] = shard_list if column == cfg.text_column else \
            f"{shard_list}:{column}"
    mixture = Mixture(plan.names, blocks, blend, [p.record() for p in plan.phases],
                      [c.global_batch for c in contexts])
    fingerprint = {"shards": lists, "tokenizer": tok.fingerprint, "separator": tok.separator_id,
                   "block_size": cfg.block_size, "seed": cfg.seed,
                   "shuffle_window": cfg.shuffle_window}
    return mixture, tok, fingerprint


def _column(cfg: DataConfig, source: Source) -> str:
    return source.text_column or cfg.text_column
