"""A phase that changes the block size mid-epoch (data/layout.py): the token stream here is
0, 1, 2, ... so an (input, label) pair is genuine exactly when label == input + 1, and its input
names the pair. Every pair of an epoch is trained on exactly once across the change (the re-cut
epoch's final partial block aside), the joins are masked, and the layout is the native one at
the new size from the next epoch on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from argonne_ds.data.encoding import TOKEN_DTYPE
from argonne_ds.data.layout import Cut, PhasedBlocks, Pool
from argonne_ds.data.stream import window_order


class Positions:
    """A store whose token i is i."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> np.ndarray:
        assert 0 <= start <= stop <= self.n
        return np.arange(start, stop, dtype=TOKEN_DTYPE)


def pairs_of(sample) -> tuple[list[int], int]:
    """(inputs of the genuine pairs, masked count); a fake pair must be masked."""
    tokens, masked = sample if isinstance(sample, tuple) else (sample, np.empty(0, np.int64))
    tokens = tokens.astype(np.int64)
    keep = np.ones(len(tokens) - 1, bool)
    keep[masked] = False
    x, y = tokens[:-1], tokens[1:]
    assert (y[keep] == x[keep] + 1).all(), "an unmasked pair is not in the data"
    assert (y[~keep] != x[~keep] + 1).all(), "a masked pair is a real one"
    return x[keep].tolist(), int((~keep).sum())


def native(n_tokens: int, T: int, seed: int, window: int, epoch: int, i: int) -> np.ndarray:
    """CachedBlocks' block for pass position i (data/stream.py's formula)."""
    n = (n_tokens - 1) // T
    j, slot = divmod(i, window)
    size = min(window, n - j * window)
    b = j * window + int(window_order(seed, epoch, j, size, window > 1)[slot])
    return np.arange(b * T, b * T + T + 1)


N, SEED, W = 1000, 7, 6


def test_without_a_change_it_is_the_cached_layout() -> None:
    blocks = PhasedBlocks(Positions(N), [(0, 8)], SEED, W)
    n = (N - 1) // 8
    for k in list(range(0, 2 * n + 5)):
        epoch, i = divmod(k, n)
        assert np.array_equal(blocks.sample(k), native(N, 8, SEED, W, epoch, i)), k


@pytest.mark.parametrize("k0", [1, 17, 61, 124, 129], ids=lambda k: f"change-at-{k}")
def test_each_pair_of_the_epoch_once_across_the_change(k0: int) -> None:
    T, T2 = 8, 24
    blocks = PhasedBlocks(Positions(N), [(0, T), (k0, T2)], SEED, W)
    n = (N - 1) // T  # 124 blocks: pairs [0, 992) of epoch 0
    seen: Counter[int] = Counter()
    for k in range(k0):
        assert np.array_equal(blocks.sample(k), native(N, T, SEED, W, *divmod(k, n)))
        if k // n == (k0 - 1) // n:  # the epoch the change falls in (or ends)
            seen.update(pairs_of(blocks.sample(k))[0])
    seg = blocks.segments[-1]
    recut = seg.recut.n if seg.recut else 0
    masked = 0
    for k in range(k0, k0 + recut):
        inputs, m = pairs_of(blocks.sample(k))
        seen.update(inputs)
        masked += m
    assert max(seen.values()) == 1, "a pair was trained on twice"
    missing = set(range(n * T)) - set(seen)  # of that epoch
    if k0 % n:  # the rest of epoch 0 was re-cut: only its last partial block is left out
        assert len(missing) < T2, len(missing)
        assert blocks.epoch_of(k0) == k0 // n and seg.first_epoch == k0 // n + 1
    else:  # the change fell on an epoch boundary: a fresh native epoch, nothing re-cut
        assert recut == 0 and not missing and seg.first_epoch == k0 // n
    # then the native layout at the new size, epoch after epoch
    n2 = (N - 1) // T2
    for i in range(n2 + 3):
        epoch, pos = divmod(i, n2)
        sample = blocks.sample(k0 + recut + i)
        assert np.array_equal(sample, native(N, T2, SEED, W, seg.first_epoch + epoch, pos))


def test_two_changes_inside_one_epoch() -> None:
    """8 -> 16 after 40 blocks, -> 32 after 10 more: what is left is re-cut twice."""
    blocks = PhasedBlocks(Positions(N), [(0, 8), (40, 16), (50, 32)], SEED, W)
    seen: Counter[int] = Counter()
    joins = 0
    end = 50 + blocks.segments[-1].recut.n
    for k in range(end):
        inputs, m = pairs_of(blocks.sample(k))
        seen.update(inputs)
        joins += m
    assert max(seen.values()) == 1
    assert joins > 0  # the shuffled first epoch left gaps: the joins are there and masked
    missing = set(range(124 * 8)) - set(seen)
    assert len(missing) < 16 + 32  # the two re-cut passes' final partial blocks
    assert blocks.sample(end).shape == (33,)


def test_a_source_not_drawn_between_two_changes() -> None:
    """A phase that takes nothing from a source: both changes at the same sample, the last
    block size wins, and the rest of the epoch is still re-cut once."""
    a = PhasedBlocks(Positions(N), [(0, 8), (30, 16), (30, 32)], SEED, W)
    b = PhasedBlocks(Positions(N), [(0, 8), (30, 32)], SEED, W)
    for k in range(25, 80):
        sa, sb = a.sample(k), b.sample(k)
        assert np.array_equal(sa[0] if isinstance(sa, tuple) else sa,
                              sb[0] if isinstance(sb, tuple) else sb)


def test_a_cut_masks_exactly_its_joins() -> None:
    pool = Pool(np.array([0, 50, 70]), np.array([20, 60, 200]))
    cut = Cut(Positions(300), pool, 16, (1, 0), window=1, shuffle=False)
    assert cut.n == (21 + 11 + 131 - 1) // 16
    got: list[int] = []
    for i in range(cut.n):
        got += pairs_of(cut.block(i))[0]
    expected = list(range(0, 20)) + list(range(50, 60)) + list(range(70, 200))
    assert got == expected[:len(got)] and len(expected) - len(got) < 16
    # Joined: range 0 holds pairs [0, 20), the join 20, range 1 [21, 31), the join 31, range 2
    # [32, 162); 10 blocks. Blocks 1-9 left: pairs [16, 160) of the joined stream.
    rest = cut.rest(1)
    assert rest.starts.tolist() == [16, 50, 70] and rest.stops.tolist() == [20, 60, 198]
    assert rest.pairs == 9 * 16 - 2  # its two joins are not pairs
    rest = cut.rest(3)  # blocks 3-9: all in range 2
    assert rest.starts.tolist() == [86] and rest.stops.tolist() == [198]
    assert cut.rest(cut.n).pairs == 0


def test_the_loader_carries_each_source_across_the_extension(ws) -> None:
    """Real cached text, one source: steps 1-3 at 32-token blocks x 8, then a launch at 64 x 4
    resumed from the first launch's data state. The (input, label) pairs drawn over the epoch
    are, as a multiset, the epoch's own pairs less fewer than 64 (the re-cut pass's end)."""
    from argonne_ds.data.loader import build_data_iterator
    from argonne_ds.phases import plan_of
    from argonne_ds.run_config import DataConfig
    from argonne_ds.run_options import from_dict

    source = {"name": "web", "data_glob": str(Path(ws["glob"]).parent / "part_1.parquet")}
    run = from_dict({"data": {"sources": [source]}, "phases": [
        {"name": "short", "start": 0}, {"name": "long", "start": 3, "block_size": 64}],
        "train": {"deepspeed_config": "d.json", "max_steps": 40}})
    plan = plan_of(run)
    contexts = plan.contexts(32, 8)
    assert [(c.block_size, c.global_batch, c.start_sample) for c in contexts] == \
        [(32, 8, 0), (64, 4, 24)]
    tok = str(next(Path(ws["cache"]).glob("tokenizer-*")))
    cfg = DataConfig(cache_dir=ws["cache"], tokenizer_path=tok, block_size=32, shuffle_window=8)

    def iterator(G: int):
        return build_data_iterator(cfg, global_batch_size=G, micro_batch_size=G, plan=plan,
                                   contexts=contexts)[0]

    short = iterator(8)
    drawn: Counter[tuple[int, int]] = Counter()

    def take(batch) -> None:
        for x, y in zip(*batch):
            keep = y != -100
            drawn.update(zip(x[keep].tolist(), y[keep].tolist()))

    for _ in range(3):
        take(next(short))
    layout = short.source.sources[0]
    assert isinstance(layout, PhasedBlocks)
    recut = layout.segments[-1].recut
    assert recut is not None and recut.n > 0
    long = iterator(4)
    long.load_state_dict(short.state_dict())
    assert long.samples == 24
    batches = -(-recut.n // 4)
    for _ in range(batches):
        x, y = next(long)
        assert x.shape == (4, 64)
        take((x, y))
    tokens = layout.store.read(0, layout.segments[0].n_native * 32 + 1).astype(np.int64)
    epoch = Counter(zip(tokens[:-1].tolist(), tokens[1:].tolist()))
    over = drawn - epoch  # drawn more often than the epoch holds: replayed (or made up)
    assert not over, f"{sum(over.values())} pairs drawn that the epoch does not hold"
    left = epoch - drawn
    # the last batch ran into the next epoch by < 4 blocks; before it, < 64 pairs unread
    assert sum(left.values()) < 64 + 4 * 64


def test_the_shipped_32k_extension_config() -> None:
    """launch/configs/argonne2_extend_32k.yaml parses, keeps 4 Mi tokens a step, and its long
    phases build a valid 32k argonne2 with YaRN over the 4k it trained at."""
    from argonne_ds.config import load_model_config, with_context
    from argonne_ds.phases import plan_of
    from argonne_ds.run_options import from_dict, load_file

    root = Path(__file__).resolve().parents[1]
    run = from_dict(load_file(root / "launch" / "configs" / "argonne2_extend_32k.yaml"))
    plan = plan_of(run)
    assert plan is not None and plan.changes_context
    got = [(c.block_size, c.global_batch, c.start_sample)
           for c in plan.contexts(run.data.block_size, run.train.global_batch_size)]
    assert got == [(4096, 1024, 0), (32768, 128, 95_000 * 1024),
                   (32768, 128, 95_000 * 1024 + 3_000 * 128)]
    long = plan.contexts(4096, 1024)[2]
    model = with_context(load_model_config(run.train.model), long.block_size,
                         long.rope_parameters, run.data.block_size)
    assert model.max_position_embeddings == 32768
    assert model.rope_parameters == {"rope_type": "yarn", "factor": 8.0,
                                     "original_max_position_embeddings": 4096,
                                     "rope_theta": 500000.0}
