"""From settings to the iterator the engine consumes: discovery, tokenizer, cache or stream."""

from __future__ import annotations

import logging
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
    from argonne_ds.data.stream import CachedBlocks, ResumableShardIterator, StreamedBlocks

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


def build_data_iterator(
    cfg: DataConfig, *, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
    dp_world: int = 1, model_vocab_size: int | None = None, show_progress: bool = True,
) -> tuple[ResumableShardIterator, LoadedTokenizer]:
    from argonne_ds.data.stream import CachedBlocks, ResumableShardIterator, StreamedBlocks

    shards = discover_shards(cfg.data_glob)
    logger.info("data: %s", describe_plan(shards))
    tok = resolve_tokenizer(cfg, shards, model_vocab_size)
    if cfg.cache_dir:
        # A complete cache: its index, read without a lock (start-up does not grow with ranks).
        index = load_cache(shards, tok, cfg.cache_dir, cfg.text_column, cfg.on_bad_shard,
                           cfg.encoder, show_progress=show_progress)
        source: CachedBlocks | StreamedBlocks = CachedBlocks(index, cfg.block_size, cfg.seed,
                                                             cfg.shuffle_window)
        shard_list = index.shard_list  # = shard_list_fingerprint(shards), checked on load
    else:
        source = StreamedBlocks(usable_shards(cfg, shards), cfg.text_column,
                                make_encoder(tok, cfg.encoder), cfg.block_size, cfg.seed,
                                cfg.shuffle_window, skip_bad=cfg.on_bad_shard == "skip")
        shard_list = shard_list_fingerprint(shards)
    fingerprint = {
        "shards": shard_list, "tokenizer": tok.fingerprint,
        "separator": tok.separator_id, "text_column": cfg.text_column,
        "block_size": cfg.block_size, "seed": cfg.seed, "shuffle_window": cfg.shuffle_window,
    }
    it = ResumableShardIterator(source, global_batch_size=global_batch_size,
                                micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                                dp_world=dp_world, fingerprint=fingerprint)
    return it, tok
