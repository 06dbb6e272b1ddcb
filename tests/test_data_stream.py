"""Packing and the resumable shard iterator: exact blocks, exact resume, rank slices, epochs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from argonne_ds.data import DataError
from argonne_ds.data.loader import DataConfig, build_data_iterator
from tests.data_helpers import qwen_tokenizer_dir, write_corpus

T = 16
SEP = 151643


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root / "shards")
    return root, texts


def reference_stream(texts_per_shard: list[list]) -> np.ndarray:
    """Independent of the package: each kept document's ids + the separator, in natural order."""
    tok = Tokenizer.from_file(f"{qwen_tokenizer_dir()}/tokenizer.json")
    ids: list[int] = []
    for texts in texts_per_shard:
        for t in texts:
            if t is not None and t.strip():
                ids += tok.encode(t, add_special_tokens=False).ids + [SEP]
    return np.array(ids, dtype=np.int64)


def make(root, *, cache: bool, shuffle: int = 0, G: int = 4, m: int = 2, rank: int = 0,
         world: int = 1, **kw):
    cfg = DataConfig([str(root / "shards" / "*.parquet")], tokenizer_path=qwen_tokenizer_dir(),
                     cache_dir=str(root / "cache") if cache else None, block_size=T,
                     shuffle_window=shuffle, seed=7, **kw)
    it, _ = build_data_iterator(cfg, global_batch_size=G, micro_batch_size=m, dp_rank=rank,
                                dp_world=world, show_progress=False)
    return it


def take(it, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(it) for _ in range(n)]


def flat(batches) -> torch.Tensor:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize("cache", [True, False])
def test_blocks_are_the_packed_stream_with_one_shift(corpus, cache: bool) -> None:
    root, texts = corpus
    ref = reference_stream(texts)
    n_blocks = (len(ref) - 1) // T
    it = make(root, cache=cache, G=1, m=1)
    for b in range(n_blocks):
        x, y = next(it)
        block = ref[b * T:b * T + T + 1]
        assert x.dtype == torch.int64 and x.shape == (1, T)
        assert np.array_equal(x[0].numpy(), block[:-1]) and np.array_equal(y[0].numpy(), block[1:])
    # Only the final partial block is dropped: fewer than T+1 tokens remained.
    assert len(ref) - n_blocks * T < T + 1
    # ... and the next sample is epoch 1, block 0.
    x, _ = next(it)
    assert np.array_equal(x[0].numpy(), ref[:T]) and it.epoch == 1


def test_cache_and_streaming_give_the_same_blocks(corpus) -> None:
    root, _ = corpus
    for shuffle in (0, 5):
        a = flat(take(make(root, cache=True, shuffle=shuffle), 40))
        b = flat(take(make(root, cache=False, shuffle=shuffle), 40))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shuffle_is_seeded_and_a_permutation_within_windows(corpus) -> None:
    root, _ = corpus
    plain = flat(take(make(root, cache=True, G=1, m=1), 10))[0]
    mixed = flat(take(make(root, cache=True, shuffle=5, G=1, m=1), 10))[0]
    again = flat(take(make(root, cache=True, shuffle=5, G=1, m=1), 10))[0]
    assert torch.equal(mixed, again) and not torch.equal(mixed, plain)
    for w in range(2):  # each window of 5 holds the same blocks, in another order
        key = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
        assert key(mixed[w * 5:(w + 1) * 5]) == key(plain[w * 5:(w + 1) * 5])


@pytest.mark.parametrize("cache,shuffle,world", list(itertools.product([True, False], [0, 5],
                                                                         [1, 2])))
def test_resume_is_exact_for_many_k(corpus, cache: bool, shuffle: int, world: int) -> None:
    """(consume k -> save -> rebuild -> load -> consume the rest) == uninterrupted, per rank,
    across the epoch boundary (the corpus holds ~50 blocks; 40 steps x 4 samples = 3+ epochs)."""
    root, _ = corpus
    steps, G, m = 40, 4, 2
    per_rank_micro = G // world // m
    for rank in range(world):
        full = take(make(root, cache=cache, shuffle=shuffle, G=G, m=m, rank=rank, world=world),
                     steps * per_rank_micro)
        for k in (0, 1, 3, 7, 12, 13, 25, 39):
            it = make(root, cache=cache, shuffle=shuffle, G=G, m=m, rank=rank, world=world)
            head = take(it, k * per_rank_micro)
            state = it.state_dict()
            resumed = make(root, cache=cache, shuffle=shuffle, G=G, m=m, rank=rank, world=world)
            resumed.load_state_dict(state)
            tail = take(resumed, (steps - k) * per_rank_micro)
            got, want = flat(head + tail), flat(full)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (rank, k)
    n_epoch = make(root, cache=True).blocks_per_epoch
    assert n_epoch < steps * G  # the runs cross an epoch boundary


@pytest.mark.parametrize("cache", [True, False])
def test_global_batch_content_does_not_depend_on_world_or_micro(corpus, cache: bool) -> None:
    root, _ = corpus
    G, steps = 8, 6
    one = flat(take(make(root, cache=cache, G=G, m=8), steps))[0]
    for world, m in ((2, 4), (2, 1), (4, 2)):
        ranks = [make(root, cache=cache, G=G, m=m, rank=r, world=world) for r in range(world)]
        per = G // world // m
        for s in range(steps):
            batch = torch.cat([flat(take(it, per))[0] for it in ranks])
            assert torch.equal(batch, one[s * G:(s + 1) * G]), (world, m, s)


def test_micro_batch_can_halve_between_global_batches(corpus) -> None:
    root, _ = corpus
    ref = flat(take(make(root, cache=True, G=8, m=4), 6))[0]
    it = make(root, cache=True, G=8, m=4)
    got = take(it, 2)
    it.set_batch_size(8, 2)  # OOM backoff: micro halves, accumulation doubles
    got += take(it, 8)
    assert torch.equal(flat(got)[0], ref)


def test_resume_from_the_middle_of_a_global_batch(corpus) -> None:
    root, _ = corpus
    full = flat(take(make(root, cache=False, shuffle=5, G=8, m=2), 12))[0]
    it = make(root, cache=False, shuffle=5, G=8, m=2)
    head = take(it, 5)
    resumed = make(root, cache=False, shuffle=5, G=8, m=2)
    resumed.load_state_dict(it.state_dict())
    assert torch.equal(torch.cat([flat(head)[0], flat(take(resumed, 7))[0]]), full)


def test_changed_shard_list_is_refused_unless_allowed(corpus, tmp_path) -> None:
    root, _ = corpus
    it = make(root, cache=True)
    take(it, 3)
    state = it.state_dict()
    state["fingerprint"]["shards"] = "0000000000000000"
    with pytest.raises(DataError, match="allow-shard-change"):
        make(root, cache=True).load_state_dict(state)
    other = make(root, cache=True)
    other.load_state_dict(state, allow_shard_change=True)
    assert (other.samples, other.micro) == (4, 1)
    state["fingerprint"]["block_size"] = 99
    with pytest.raises(DataError, match="block_size"):
        make(root, cache=True).load_state_dict(state, allow_shard_change=True)


def test_stream_state_is_refused_without_its_mode(corpus) -> None:
    root, _ = corpus
    it = make(root, cache=True)
    take(it, 2)
    with pytest.raises(DataError, match="cache"):
        make(root, cache=False).load_state_dict(it.state_dict())
