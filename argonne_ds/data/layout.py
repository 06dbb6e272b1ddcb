"""Blocks when a phase changes the context: the data position carries over by tokens.

A source's blocks at block size T are cuts of its token stream (data/stream.py: block b is
stream[b*T : b*T + T + 1], shuffled inside windows per epoch). A phase that changes T to T'
(a context extension) starts while an epoch is part read: with shuffling, the blocks drawn so far
are a random subset of that epoch. To replay nothing and skip nothing, the rest of that epoch is
re-cut at T' over exactly the blocks *not* drawn: their token ranges in ascending order, joined
into one stream, cut into blocks of T' + 1 tokens and shuffled by the phase's seed (a `Cut` of a
`Pool`). Where two ranges meet, the one (input, label) pair that joins them is not in the data:
its label is masked (-100), so every pair of the epoch is trained on exactly once; the epoch's
final partial block (fewer than T' pairs) is dropped, as every epoch's is. From the next epoch on
the layout is the native one at T'. A second change inside the re-cut epoch re-cuts what is left
of it again: the same rule, any number of phases.

Everything is a pure function of the source's sample index (cache mode), so a resume is a seek.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from argonne_ds.data import DataError
from argonne_ds.data.encoding import TOKEN_DTYPE


def too_short(n_tokens: int, block_size: int) -> DataError:
    return DataError(f"the data holds {n_tokens:,} tokens, fewer than one block of "
                     f"{block_size + 1} (block_size + 1); add shards or lower the block size")


class RandomAccess:
    """A source whose every block is a pure function of its sample index (the token cache):
    nothing to release, no position to save; a resume is a seek."""

    mode = "cache"

    def release(self, g: int) -> None:
        pass

    def state_dict(self, g: int) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], g: int) -> None:
        pass


class Store(Protocol):
    def __len__(self) -> int: ...
    def read(self, start: int, stop: int) -> np.ndarray: ...


def window_order(key: Sequence[int], size: int, shuffle: bool) -> np.ndarray:
    """The permutation of one shuffle window (the key: seed, epoch, window[, phase salt])."""
    if not shuffle or size <= 1:
        return np.arange(size)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))
    return rng.permutation(size)


@dataclass(frozen=True)
class Pool:
    """Pair ranges [start, stop) of a token stream, ascending and disjoint (pair i: token i ->
    token i + 1). Range r contributes tokens start_r .. stop_r to the joined stream."""

    starts: np.ndarray
    stops: np.ndarray

    @staticmethod
    def whole(n_tokens: int) -> Pool:
        return Pool(np.array([0], np.int64), np.array([max(n_tokens - 1, 0)], np.int64))

    @property
    def pairs(self) -> int:
        return int((self.stops - self.starts).sum())


class Cut:
    """One pass over a pool at block size T: n blocks, shuffled in windows by `key` + window."""

    def __init__(self, store: Store, pool: Pool, T: int, key: Sequence[int], window: int,
                 shuffle: bool) -> None:
        self.store, self.pool, self.T = store, pool, T
        self.key, self.window, self.shuffle = tuple(key), max(1, window), shuffle
        lengths = pool.stops - pool.starts + 1  # tokens per range in the joined stream
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.n = max(int(self.offsets[-1]) - 1, 0) // T if len(lengths) else 0
        self._order: tuple[int, np.ndarray] | None = None

    def _block_id(self, i: int) -> int:
        j, slot = divmod(i, self.window)
        if self._order is None or self._order[0] != j:
            size = min(self.window, self.n - j * self.window)
            self._order = (j, window_order((*self.key, j), size, self.shuffle))
        return j * self.window + int(self._order[1][slot])

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Pass position i -> (T + 1 tokens, label positions to mask: the joins)."""
        lo = self._block_id(i) * self.T
        hi = lo + self.T + 1  # joined-stream tokens [lo, hi)
        r0 = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        r1 = int(np.searchsorted(self.offsets, hi - 1, side="right")) - 1
        if r0 == r1:  # the usual case: one range
            a = int(self.pool.starts[r0] + lo - self.offsets[r0])
            return self.store.read(a, a + self.T + 1), _NONE
        parts, masked = [], []
        for r in range(r0, r1 + 1):
            s, e = max(lo, int(self.offsets[r])), min(hi, int(self.offsets[r + 1]))
            a = int(self.pool.starts[r] + s - self.offsets[r])
            parts.append(self.store.read(a, a + e - s))
            if r > r0:  # the label of the pair that joins range r-1 to range r
                masked.append(s - lo - 1)
        return np.concatenate(parts).astype(TOKEN_DTYPE), np.array(masked, np.int64)

    def rest(self, c: int) -> Pool:
        """The pairs of this pass's blocks not among the first c drawn, as a pool of the
        original stream (its joins excluded: they are not pairs of the data)."""
        if c >= self.n:
            return Pool(np.empty(0, np.int64), np.empty(0, np.int64))
        j, slot = divmod(c, self.window)
        size = min(self.window, self.n - j * self.window)
        order = window_order((*self.key, j), size, self.shuffle)
        ids = np.sort(j * self.window + order[slot:])
        spans = [(int(b) * self.T, int(b) * self.T + self.T) for b in ids]  # joined pairs
        after = (j + 1) * self.window
        if after < self.n:
            spans.append((after * self.T, self.n * self.T))
        return _merge(self._to_stream(spans))

    def _to_stream(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Joined-stream pair spans -> original pair ranges. Range r holds the joined pairs
        [offsets[r], offsets[r+1] - 1); the pair at offsets[r+1] - 1 is a join, left out."""
        out, starts, off = [], self.pool.starts, self.offsets
        for lo, hi in spans:
            r = int(np.searchsorted(off, lo, side="right")) - 1
            while r < len(starts) and off[r] < hi:
                a, b = max(lo, int(off[r])), min(hi, int(off[r + 1]) - 1)
                if b > a:
                    base = int(starts[r] - off[r])
                    out.append((base + a, base + b))
                r += 1
        return out


def _merge(spans: list[tuple[int, int]]) -> Pool:
    spans.sort()
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    arr = np.array(merged, np.int64).reshape(-1, 2)
    return Pool(arr[:, 0].copy(), arr[:, 1].copy())


_NONE = np.empty(0, np.int64)


@dataclass
class Segment:
    """The blocks at one block size, from source sample `k0` on: a re-cut of what was left of
    the epoch (`recut`, may be None) then native epochs from `first_epoch`."""

    T: int
    k0: int
    recut: Cut | None
    first_epoch: int
    n_native: int


class PhasedBlocks(RandomAccess):
    """A cached source whose block size changes at given source samples (data/mixture.py counts
    them per source at each context phase's start). Before the first change it is exactly
    `CachedBlocks`; `sample(k)` returns the tokens, or (tokens, masked label positions)."""

    def __init__(self, store: Store, changes: Sequence[tuple[int, int]], seed: int,
                 shuffle_window: int) -> None:
        """`changes`: (source sample, block size) pairs, ascending, the first at sample 0."""
        if not changes or changes[0][0] != 0:
            raise ValueError("the first block size applies from sample 0")
        self.store, self.seed = store, seed
        self.window, self.shuffle = max(1, shuffle_window), shuffle_window > 1
        self.n_tokens = len(store)
        self.segments: list[Segment] = []
        self._native: dict[tuple[int, int], Cut] = {}
        kept: list[tuple[int, int]] = []
        for k0, T in changes:  # a phase that drew nothing from this source changes nothing
            if kept and kept[-1][0] == k0:
                kept.pop()
            if not kept or kept[-1][1] != T:
                kept.append((k0, T))
        for i, (k0, T) in enumerate(kept):
            if i == 0:
                self.segments.append(Segment(T, 0, None, 0, self._n(T)))
                continue
            cut, c, epoch = self._locate(k0)  # where the layout so far stands
            pool = cut.rest(c) if c else None
            recut = None
            if pool is not None and pool.pairs:
                recut = Cut(store, pool, T, (seed, epoch, i), self.window, self.shuffle)
                recut = recut if recut.n else None
            self.segments.append(Segment(T, k0, recut, epoch + (1 if c else 0), self._n(T)))
        self.n_epoch = self.segments[-1].n_native  # the current layout's (for messages)

    def _n(self, T: int) -> int:
        n = (self.n_tokens - 1) // T
        if n < 1:
            raise too_short(self.n_tokens, T)
        return n

    def native(self, T: int, epoch: int) -> Cut:
        key = (T, epoch)
        if key not in self._native:
            if len(self._native) > 4:
                self._native.clear()
            self._native[key] = Cut(self.store, Pool.whole(self.n_tokens), T,
                                    (self.seed, epoch), self.window, self.shuffle)
        return self._native[key]

    def _locate(self, k: int) -> tuple[Cut, int, int]:
        """Source sample k -> (the pass it is in, its position there, the epoch)."""
        seg = next(s for s in reversed(self.segments) if s.k0 <= k)
        local = k - seg.k0
        if seg.recut is not None:
            if local < seg.recut.n:
                return seg.recut, local, seg.first_epoch - 1
            local -= seg.recut.n
        epoch, i = divmod(local, seg.n_native)
        return self.native(seg.T, seg.first_epoch + epoch), i, seg.first_epoch + epoch

    def sample(self, k: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        cut, i, _ = self._locate(k)
        tokens, masked = cut.block(i)
        return (tokens, masked) if len(masked) else tokens

    def epoch_of(self, k: int) -> int:
        return self._locate(k)[2]

    def passes(self, k: int) -> float:
        """Passes over the data by source sample k (a re-cut pass ends its epoch)."""
        cut, i, epoch = self._locate(k)
        if len(cut.key) == 2:  # native (seed, epoch): the whole epoch
            return epoch + i / cut.n
        return epoch + 1 - (cut.n - i) * cut.T / max(self.n_tokens - 1, 1)
