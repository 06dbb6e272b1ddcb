"""Packing and the resumable shard iterator that feeds the DeepSpeed engine.

Packing: all documents (each followed by the separator) form one token stream per epoch. Block b
is stream[b*T : b*T + T + 1] (stride T, overlap 1) and yields inputs = block[:-1], labels =
block[1:]: the one shift. No document tail is dropped; only the final partial block at the very end
of the data (fewer than T+1 tokens left) is, once per epoch.

Order: global sample g -> (epoch, k) -> block. With shuffling, blocks are permuted inside windows of
`shuffle_window` blocks by a generator seeded with (seed, epoch, window): deterministic, and
resumable from the sample index alone.

Ranks: every optimizer step consumes one global batch of G samples [s, s+G). Data-parallel rank r
of W takes [s + r*G/W, s + (r+1)*G/W), cut into micro-batches; so a global batch's content does not
depend on W or on the micro-batch size (the OOM backoff may halve it).

Sources: `CachedBlocks` reads the prepared cache (random access: resume is a seek), and
`StreamedBlocks` tokenizes while streaming from parquet (sequential: resume re-opens the shard at
the saved row and re-tokenizes at most the current window).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from argonne_ds.data import DataError, layout
from argonne_ds.data.cache import CacheIndex, TokenStore
from argonne_ds.data.discovery import Shard
from argonne_ds.data.encoding import TOKEN_DTYPE
from argonne_ds.data.layout import PhasedBlocks
from argonne_ds.data.mixture import Mixture
from argonne_ds.data.reader import StreamPos, TokenReader
from argonne_ds.data.tokenizer import Encoder

logger = logging.getLogger(__name__)
STATE_VERSION = 1
IGNORE_INDEX = -100  # the loss's (model/loss.py): a label not trained on


def window_order(seed: int, epoch: int, window: int, size: int, shuffle: bool) -> np.ndarray:
    return layout.window_order((seed, epoch, window), size, shuffle)


class CachedBlocks(layout.RandomAccess):
    """Blocks straight from the memory-mapped cache: any block in O(1)."""

    def __init__(self, index: CacheIndex, block_size: int, seed: int, shuffle_window: int) -> None:
        self.index = index
        self.store = TokenStore(*index.token_files())  # lengths from the index: no stat
        self.T = block_size
        self.n_epoch = (len(self.store) - 1) // block_size
        if self.n_epoch < 1:
            raise layout.too_short(len(self.store), block_size)
        self.seed, self.window = seed, max(1, shuffle_window)
        self.shuffle = shuffle_window > 1
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def sample(self, g: int) -> np.ndarray:
        epoch, k = divmod(g, self.n_epoch)
        j, slot = divmod(k, self.window)
        key = (epoch, j)
        if key not in self._orders:
            size = min(self.window, self.n_epoch - j * self.window)
            self._orders = {key: window_order(self.seed, epoch, j, size, self.shuffle)}
        b = j * self.window + int(self._orders[key][slot])
        return self.store.read(b * self.T, b * self.T + self.T + 1)


class StreamedBlocks:
    """Blocks tokenized while streaming from parquet: the same blocks as the cache, read forward a
    window at a time. Positions of window starts are kept so any rank can resume."""

    mode = "stream"

    def __init__(self, shards: Sequence[Shard], text_column: str, encoder: Encoder,
                 block_size: int, seed: int, shuffle_window: int, skip_bad: bool = False) -> None:
        self.shards, self.col, self.encoder = shards, text_column, encoder
        self.skip_bad = skip_bad
        self.T, self.seed = block_size, seed
        self.window, self.shuffle = max(1, shuffle_window), shuffle_window > 1
        self.n_epoch: int | None = None
        self.marks: dict[int, dict[str, Any]] = {}  # window start g -> where to resume it
        self._start(epoch=0, j=0, g0=0, pos=StreamPos(), carry=None)

    def _start(self, epoch: int, j: int, g0: int, pos: StreamPos, carry: int | None) -> None:
        self.epoch, self.j, self.g_window = epoch, j, g0
        self.reader = TokenReader(self.shards, self.col, self.encoder, pos, self.skip_bad)
        self.carry = carry
        self.blocks: list[np.ndarray] = []
        self._fill()

    def _fill(self) -> None:
        """Read window j of the epoch (fewer blocks at the end of the epoch)."""
        self.marks[self.g_window] = {"epoch": self.epoch, "window": self.j,
                                     "pos": asdict(self.reader.position()), "carry": self.carry}
        if self.carry is None:
            first = self.reader.read(1)
            if not len(first):
                raise layout.too_short(0, self.T)
            self.carry = int(first[0])
        raw = []
        for _ in range(self.window):
            new = self.reader.read(self.T)
            if len(new) < self.T:
                break  # the final partial block of the epoch: dropped
            raw.append(np.concatenate([[self.carry], new]).astype(TOKEN_DTYPE))
            self.carry = int(new[-1])
        if not raw and self.j == 0:
            raise layout.too_short(self.T, self.T)
        order = window_order(self.seed, self.epoch, self.j, len(raw), self.shuffle)
        self.blocks = [raw[i] for i in order]
        if len(raw) < self.window:
            self.n_epoch = self.j * self.window + len(raw)

    def sample(self, g: int) -> np.ndarray:
        while g >= self.g_window + len(self.blocks):
            self._advance()
        if g < self.g_window:
            raise RuntimeError(f"streaming source cannot go back to sample {g}")
        return self.blocks[g - self.g_window]

    def _advance(self) -> None:
        g_next = self.g_window + len(self.blocks)
        if len(self.blocks) < self.window:  # that was the last window: next epoch
            self._start(self.epoch + 1, 0, g_next, StreamPos(), None)
            return
        self.j += 1
        self.g_window = g_next
        self._fill()

    def _mark_for(self, g: int) -> int:
        starts = [s for s in self.marks if s <= g]
        if not starts:
            raise RuntimeError(f"no resume mark at or before sample {g}")
        return max(starts)

    def release(self, g: int) -> None:
        """No resume will ever start before sample g: forget older window marks."""
        start = self._mark_for(g)
        for old in [s for s in self.marks if s < start]:
            del self.marks[old]

    def state_dict(self, g: int) -> dict[str, Any]:
        """Where to resume so that sample g (and everything after it) can be produced."""
        start = self._mark_for(g)
        return {"g_window": start, "n_epoch": self.n_epoch, **self.marks[start]}

    def load_state_dict(self, state: dict[str, Any], g: int) -> None:
        if not state:
            raise DataError("the checkpoint's data position was saved reading from the token "
                            "cache; resume with the same --cache-dir (argonne-ds prepare)")
        self.n_epoch = state["n_epoch"]
        self.marks = {}
        self._start(state["epoch"], state["window"], state["g_window"],
                    StreamPos(**state["pos"]), state["carry"])


class ResumableShardIterator:
    """Yields (input_ids, labels), each (micro_batch, T) int64, for this data-parallel rank."""

    def __init__(
        self, source: CachedBlocks | StreamedBlocks | PhasedBlocks | Mixture, *,
        global_batch_size: int,
        micro_batch_size: int, dp_rank: int = 0, dp_world: int = 1,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.fingerprint = fingerprint or {}
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.samples = 0  # global samples consumed by completed global batches
        self.micro = 0  # micro-batches this rank consumed of the current global batch
        self.set_batch_size(global_batch_size, micro_batch_size)

    def set_batch_size(self, global_batch_size: int, micro_batch_size: int) -> None:
        """Change the micro-batch (OOM backoff) at a global-batch boundary: data order stays."""
        per_rank, rem = divmod(global_batch_size, self.dp_world)
        if rem or per_rank % micro_batch_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by "
                             f"{self.dp_world} ranks x micro-batch {micro_batch_size}")
        if self.micro:
            raise RuntimeError("batch size can only change between global batches")
        self.G, self.m, self.per_rank = global_batch_size, micro_batch_size, per_rank

    def __iter__(self) -> ResumableShardIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.samples + self.dp_rank * self.per_rank + self.micro * self.m
        if isinstance(self.source, Mixture):
            items = self.source.samples(first, self.m)
        else:
            items = [self.source.sample(g) for g in range(first, first + self.m)]
        self.micro += 1
        if self.micro * self.m == self.per_rank:
            self.samples += self.G
            self.micro = 0
            self.source.release(self.samples)
        # A block re-cut by a context phase may join two ranges of the data (data/layout.py):
        # it comes as (tokens, label positions to mask).
        blocks = np.stack([b[0] if isinstance(b, tuple) else b for b in items])
        x = torch.from_numpy(blocks.astype(np.int64))  # (m, T+1)
        labels = x[:, 1:]
        if any(isinstance(b, tuple) for b in items):
            labels = labels.clone()  # the inputs are a view of the same tokens
            for i, b in enumerate(items):
                if isinstance(b, tuple):
                    labels[i, torch.from_numpy(b[1])] = IGNORE_INDEX
        return x[:, :-1], labels

    @property
    def epoch(self) -> int:
        n = self.source.n_epoch
        return self.samples // n if n else 0

    @property
    def mode(self) -> str:
        """"cache" (token files, any position a seek away) or "stream" (tokenized on the fly)."""
        return self.source.mode

    @property
    def blocks_per_epoch(self) -> int | None:
        """Blocks in one pass over the data: known up front from the cache; when streaming,
        learnt at the end of the first pass (None until then)."""
        return self.source.n_epoch

    @property
    def cache_index(self) -> CacheIndex:
        """The token cache's index (shards, token counts); cache mode only."""
        if not isinstance(self.source, CachedBlocks):
            raise RuntimeError("the data is streamed: there is no token cache index")
        return self.source.index

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "samples": self.samples, "micro": self.micro,
            "global_batch_size": self.G, "micro_batch_size": self.m, "mode": self.source.mode,
            "fingerprint": self.fingerprint, "source": self.source.state_dict(self.samples),
            "epoch": self.epoch,
        }

    def _check_source_shards(self, saved: dict[str, str], now: dict[str, str], allow: bool
                             ) -> None:
        """A mixture: every source of the checkpoint must read the same shards (sources new
        since then are checked by the blend: they may not have been drawn from yet)."""
        for name in sorted(set(saved) & set(now)):
            if saved[name] == now[name]:
                continue
            if not allow:
                raise DataError(f"source {name!r}: its shard list changed since the checkpoint "
                                f"({saved[name]} -> {now[name]}); pass --allow-shard-change to "
                                "continue at the same sample index anyway")
            logger.warning("data: source %r's shard list changed since the checkpoint; "
                           "continuing as --allow-shard-change asks", name)

    def seek(self, samples: int) -> None:
        """Continue at global sample `samples` (cache mode: any sample is O(1) away)."""
        if self.source.mode != "cache" or self.micro:
            raise RuntimeError("seek needs the token cache and a global-batch boundary")
        self.samples = samples

    def load_state_dict(self, state: dict[str, Any], allow_shard_change: bool = False) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} is not "
                            f"{STATE_VERSION}; this checkpoint comes from another argonne-ds")
        saved, now = state.get("fingerprint", {}), self.fingerprint
        if isinstance(now.get("shards"), dict) and not isinstance(saved.get("shards"), dict):
            raise DataError("the checkpoint was written by a one-source run (data.data_glob); "
                            "this run has data.sources: resume it with its data_glob, or start "
                            "the mixture in a new --output-dir")
        if isinstance(saved.get("shards"), dict) and not isinstance(now.get("shards"), dict):
            raise DataError("the checkpoint was written by a run with data.sources; resume it "
                            "with its sources (this run has one data_glob)")
        for key in sorted(set(saved) | set(now)):
            if saved.get(key) == now.get(key):
                continue
            if key == "shards" and isinstance(saved.get(key), dict):
                self._check_source_shards(saved[key], now.get(key), allow_shard_change)
                continue
            if key == "shards" and allow_shard_change:
                logger.warning("data: the shard list changed since the checkpoint (%s -> %s); "
                               "continuing at sample %d as --allow-shard-change asks",
                               saved.get(key), now.get(key), state["samples"])
                continue
            hint = ("pass --allow-shard-change to continue at the same sample index anyway"
                    if key == "shards" else "resume with the settings the run started with")
            raise DataError(f"data {key} changed since the checkpoint ({saved.get(key)!r} -> "
                            f"{now.get(key)!r}); {hint}")
        if state["micro"] and state["global_batch_size"] != self.G:
            raise DataError("the checkpoint was taken inside a global batch of a different size")
        self.samples, self.micro = int(state["samples"]), int(state["micro"])
        if state.get("source") or self.source.mode == "stream":
            self.source.load_state_dict(state.get("source", {}), self.samples)
