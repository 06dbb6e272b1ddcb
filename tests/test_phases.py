"""Sources, phases and the blend, without a training job: the realised proportions stay within one
sample of the weights, the blend is a function of the index (a seek at sample 10**9 is a
lookup), every source continues exactly across phases, a started phase cannot change, the run
config names each bad source or phase, and the learning rate follows its formula."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from argonne_ds.data import DataError
from argonne_ds.data.mixture import Blend, Mixture, Span, period_table
from argonne_ds.phases import Plan, exact_weights, plan_of
from argonne_ds.run_config import ConfigError
from argonne_ds.run_options import from_dict
from argonne_ds.schedule import LRShape, WSDSchedule, wsd_shape


def reference_blend(weights: list[Fraction], n: int) -> list[int]:
    """Tijdeman's rule, sample by sample, in exact fractions: the definition the tables follow."""
    live = [s for s, w in enumerate(weights) if w]
    delta = Fraction(1, max(2 * len(live) - 2, 1))
    counts, out = [0] * len(weights), []
    for t in range(1, n + 1):
        eligible = [s for s in live if weights[s] * t - counts[s] >= delta] or live
        s = min(eligible, key=lambda s: ((counts[s] + 1 - delta) / weights[s], s))
        counts[s] += 1
        out.append(s)
    return out


WEIGHT_SETS = [[0.7, 0.2, 0.1], [0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.25, 0.1, 0.05],
               [0.123456789, 0.3, 0.5], [3.0, 1.0, 0.0, 2.0], [0.01, 0.99],
               [0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05]]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: "-".join(f"{x:.3g}" for x in w))
@pytest.mark.parametrize("global_batch", [8, 12])
def test_realised_proportions_stay_within_one_sample(weights: list[float],
                                                     global_batch: int) -> None:
    """Over 1,000 global batches, at every batch boundary, C_s(N) - w_s N is within (-1, 1),
    for the weights as given (exact decimals) and for weights rounded to 1/65536."""
    parts, d = exact_weights(weights)
    blend = Blend([Span("main", 0, tuple(parts))])
    src, _ = blend.locate(0, 1000 * global_batch)
    share = np.array(weights) / sum(weights)
    exact = d < 1 << 16  # else rounded: within 1/65536 of the weight each
    for b in range(1, 1001):
        n = b * global_batch
        counts = np.bincount(src[:n], minlength=len(weights))
        assert (counts == blend.counts(n)).all()
        target = share * n if exact else np.array(parts) / d * n
        assert np.abs(counts - target).max() < 1, (b, counts, target)
        assert np.abs(counts - share * n).max() < 1 + n / (1 << 16)
    assert (np.bincount(src, minlength=len(weights))[share == 0] == 0).all()


@pytest.mark.parametrize("weights", WEIGHT_SETS[:4] + WEIGHT_SETS[5:6])
def test_tables_follow_the_rule_sample_by_sample(weights: list[float]) -> None:
    parts, d = exact_weights(weights)
    ref = reference_blend([Fraction(p, d) for p in parts], 3 * d + 7)
    choice, counts = period_table(tuple(parts))
    assert list(choice) == ref[:d]
    assert ref[d:2 * d] == ref[:d]  # the period closes: counts are exactly a_s after D samples
    assert list(counts[d]) == parts
    blend = Blend([Span("main", 0, tuple(parts))])
    assert list(blend.locate(0, 3 * d + 7)[0]) == ref


def test_sources_continue_across_phases_and_a_seek_is_a_lookup() -> None:
    G = 8
    spans = [Span("stable", 0, (7, 2, 1)), Span("anneal", 40 * G, (1, 0, 1)),
             Span("more", 90 * G, (2, 1, 1))]
    blend = Blend(spans)
    src, k = blend.locate(0, 150 * G)
    for s in range(3):  # each source's samples 0, 1, 2, ... in order: nothing replayed, skipped
        assert list(k[src == s]) == list(range(int((src == s).sum())))
    assert (src[40 * G:90 * G] != 1).all()  # weight 0 in the anneal
    # Any window, asked for alone, is what the sequential walk gives.
    for first in (0, 3, 40 * G - 5, 90 * G, 150 * G - 9):
        s2, k2 = blend.locate(first, 9)
        assert (s2 == src[first:first + 9]).all() and (k2 == k[first:first + 9]).all()
    # Sample 10**9 + j of the last phase: the period repeats, counts advance by whole periods.
    far = 10**9 + 5
    s_far, k_far = blend.locate(far, 4)
    i = far - spans[2].start
    q, r = divmod(i, 4)
    s_near, k_near = blend.locate(spans[2].start + r, 4)
    assert (s_far == s_near).all()
    assert (k_far - k_near == q * np.array((2, 1, 1))[s_far]).all()
    # Appending a phase moves nothing before it.
    longer = Blend([*spans, Span("late", 200 * G, (0, 0, 1))])
    s3, k3 = longer.locate(0, 150 * G)
    assert (s3 == src).all() and (k3 == k).all()


def test_exact_weights() -> None:
    assert exact_weights([0.7, 0.2, 0.1]) == ([7, 2, 1], 10)
    assert exact_weights([3, 1]) == ([3, 1], 4)
    parts, d = exact_weights([math.pi, math.e])
    assert d == 1 << 16 and sum(parts) == d
    assert abs(parts[0] / d - math.pi / (math.pi + math.e)) < 1 / d


class ListBlocks:
    """A source of numbered blocks: block k of source s is [s*1000 + k] * 3."""

    mode = "cache"

    def __init__(self, s: int, n: int = 50) -> None:
        self.s, self.n_epoch = s, n

    def sample(self, k: int) -> np.ndarray:
        return np.full(3, self.s * 1000 + k % self.n_epoch, np.uint32)

    def release(self, g: int) -> None:
        pass

    def state_dict(self, g: int) -> dict:
        return {}

    def load_state_dict(self, state: dict, g: int) -> None:
        pass


def mixture_iterator(phases: list[dict], dp_rank: int = 0, dp_world: int = 1, micro: int = 2):
    from argonne_ds.data.stream import ResumableShardIterator

    G = 8
    names = ("web", "code", "math")
    spans = [Span(p["name"], p["start"] * G,
                  tuple(exact_weights([p["weights"][n] for n in names])[0])) for p in phases]
    mix = Mixture(names, [ListBlocks(i) for i in range(3)], Blend(spans), phases, G)
    return ResumableShardIterator(mix, global_batch_size=G, micro_batch_size=micro,
                                  dp_rank=dp_rank, dp_world=dp_world,
                                  fingerprint={"shards": {n: n for n in names}})


STABLE = {"name": "stable", "start": 0, "weights": {"web": 0.5, "code": 0.3, "math": 0.2},
          "decay": None}
ANNEAL = {"name": "anneal", "start": 6, "weights": {"web": 0.2, "code": 0.0, "math": 0.8},
          "decay": "linear"}


def take(it, n: int) -> list[int]:
    return [int(v) for _ in range(n) for v in next(it)[0][:, 0]]


def test_a_global_batch_does_not_depend_on_ranks_or_micro_batch() -> None:
    one = take(mixture_iterator([STABLE, ANNEAL], micro=4), 2 * 10)
    for world, micro in ((2, 2), (4, 1), (2, 1)):
        per_rank = [take(mixture_iterator([STABLE, ANNEAL], r, world, micro), 8 // world // micro
                         * 10) for r in range(world)]
        merged = []
        for step in range(10):
            for r in range(world):
                n = 8 // world
                merged += per_rank[r][step * n:(step + 1) * n]
        assert merged == one


def test_resume_with_a_phase_appended_continues_every_source() -> None:
    full = mixture_iterator([STABLE, ANNEAL])
    expected = take(full, 4 * 12)
    a = mixture_iterator([STABLE])
    first = take(a, 4 * 6)
    state = a.state_dict()
    assert [p["name"] for p in state["source"]["phases"]] == ["stable"]
    b = mixture_iterator([STABLE, ANNEAL])  # the anneal appended at the checkpoint's step
    b.load_state_dict(state)
    assert first + take(b, 4 * 6) == expected
    # The state names every source's position.
    assert set(state["source"]["mixture"]) == {"web", "code", "math"}


def test_a_started_phase_cannot_change() -> None:
    a = mixture_iterator([STABLE, ANNEAL])
    take(a, 4 * 8)  # 8 steps: the anneal (start 6) has started
    state = a.state_dict()
    changed = {**ANNEAL, "weights": {"web": 0.5, "code": 0.0, "math": 0.5}}
    with pytest.raises(DataError, match="phase 'anneal' started at step 6.*weights"):
        mixture_iterator([STABLE, changed]).load_state_dict(state)
    with pytest.raises(DataError, match="phase 'anneal' started at step 6.*is gone"):
        mixture_iterator([STABLE]).load_state_dict(state)
    late = {**ANNEAL, "name": "late", "start": 7}
    with pytest.raises(DataError, match="phase 'late' starts at step 7, before this checkpoint's"):
        mixture_iterator([STABLE, ANNEAL, late]).load_state_dict(state)
    # A phase that has not started may change; at its own start step it has not started yet.
    b = mixture_iterator([STABLE, ANNEAL])
    take(b, 4 * 6)
    state = b.state_dict()
    moved = {**ANNEAL, "start": 9}
    c = mixture_iterator([STABLE, moved])
    c.load_state_dict(state)
    take(c, 4)


def test_a_one_source_run_keeps_its_checkpoint_format(tmp_path: Path) -> None:
    """The state of a plain data_glob run is what checkpoints held before sources existed."""
    from argonne_ds.data.stream import CachedBlocks, ResumableShardIterator
    from tests.data_helpers import write_corpus
    from tests.train_helpers import make_workspace

    del write_corpus
    ws = make_workspace(tmp_path)
    from argonne_ds.data.loader import build_data_iterator
    from argonne_ds.run_config import DataConfig

    cfg = DataConfig(data_glob=[ws["glob"]], cache_dir=ws["cache"], block_size=16,
                     fallback_vocab_size=512)
    it, _ = build_data_iterator(cfg, global_batch_size=4, micro_batch_size=2)
    assert isinstance(it, ResumableShardIterator) and isinstance(it.source, CachedBlocks)
    next(it), next(it)
    state = it.state_dict()
    assert set(state) == {"version", "samples", "micro", "global_batch_size",
                          "micro_batch_size", "mode", "fingerprint", "source", "epoch"}
    assert state["version"] == 1 and state["source"] == {}
    assert set(state["fingerprint"]) == {"shards", "tokenizer", "separator", "text_column",
                                         "block_size", "seed", "shuffle_window"}
    assert isinstance(state["fingerprint"]["shards"], str)
    # Neither kind of run takes the other's checkpoint.
    with pytest.raises(DataError, match="written by a one-source run"):
        mixture_iterator([STABLE]).load_state_dict(state)
    with pytest.raises(DataError, match="written by a run with data.sources"):
        it.load_state_dict(mixture_iterator([STABLE]).state_dict())


def test_streamed_sources_give_the_cached_blocks_and_resume(tmp_path: Path) -> None:
    """Without a cache each source is tokenized while streaming: the same blocks as from the
    cache, and a resume from the saved positions continues them."""
    from argonne_ds.data.loader import build_data_iterator
    from argonne_ds.run_config import DataConfig
    from tests.train_helpers import make_workspace

    ws = make_workspace(tmp_path)
    shards = Path(ws["glob"]).parent
    run = run_with([{"name": n, "data_glob": str(shards / f"{f}.parquet"), "weight": w}
                    for n, f, w in (("a", "part_1", 0.5), ("b", "part_2", 0.3),
                                    ("c", "part_10", 0.2))],
                   [{"name": "s"}, {"name": "t", "start": 5, "weights": {"a": 1, "c": 3}}])
    plan = plan_of(run)
    tok = str(next((tmp_path / "cache").glob("tokenizer-*")))

    def iterator(cache: str | None):
        cfg = DataConfig(cache_dir=cache, tokenizer_path=tok, block_size=16, shuffle_window=4)
        return build_data_iterator(cfg, global_batch_size=4, micro_batch_size=2, plan=plan)[0]

    cached, streamed = iterator(ws["cache"]), iterator(None)
    assert streamed.mode == "stream" and cached.mode == "cache"
    expect = [next(cached)[0].tolist() for _ in range(2 * 12)]
    first = [next(streamed)[0].tolist() for _ in range(2 * 7)]
    assert first == expect[:14]
    state = streamed.state_dict()
    again = iterator(None)
    again.load_state_dict(state)
    assert first + [next(again)[0].tolist() for _ in range(10)] == expect


# ---- the run config: bad input named ----------------------------------------------------------

def run_with(sources: list | None = None, phases: list | None = None, **data):
    raw = {"data": {"sources": sources or [], **data},
           "train": {"deepspeed_config": "d.json", "max_steps": 10}}
    if phases is not None:
        raw["phases"] = phases
    return from_dict(raw)


TWO = [{"name": "web", "data_glob": "w/*.parquet", "weight": 0.7},
       {"name": "code", "data_glob": ["c/*.parquet"], "weight": 0.3}]


@pytest.mark.parametrize(("sources", "phases", "message"), [
    ([{**TWO[0], "weight": -1}, TWO[1]], None, "source 'web': the weight must be >= 0"),
    ([{**TWO[0], "weight": 0}, {**TWO[1], "weight": 0}], None, "weights are all zero"),
    ([{**TWO[0], "weight": "lots"}], None, "source 'web': the weight must be a number"),
    (TWO, [{"name": "stable", "start": 0, "weights": {"web": 1, "books": 1}}],
     "phase 'stable' names source 'books', which data.sources does not define"),
    (TWO, [{"name": "stable", "start": 0}, {"name": "anneal", "start": 0}],
     "phase 'anneal' starts at step 0, not after phase 'stable'"),
    (TWO, [{"name": "stable", "start": 5}], "the first phase starts at step 0"),
    (TWO, [{"name": "stable"}, {"name": "anneal", "start": 9, "weights": {"web": 0}}],
     "the weights of phase 'anneal' are all zero"),
    (TWO, [{"name": "stable"}, {"name": "anneal", "start": 9, "decay": "steep"}],
     "phase 'anneal': decay must be one of linear|cosine|1-sqrt"),
    ([TWO[0], {**TWO[1], "name": "web"}], None, "source 'web' is named twice"),
    ([{**TWO[0], "wieght": 1}], None, "source 'web': unknown key 'wieght'"),
    ([{"data_glob": "x"}], None, "data.sources\\[0\\] needs a name"),
])
def test_bad_sources_and_phases_are_named(sources, phases, message) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_of(run_with(sources, phases))


def test_phases_need_sources_and_sources_exclude_a_glob() -> None:
    with pytest.raises(ConfigError, match="phases need named sources"):
        plan_of(run_with(None, [{"name": "a"}], data_glob=["x"]))
    with pytest.raises(ConfigError, match="not both"):
        plan_of(run_with(TWO, None, data_glob=["x"]))
    assert plan_of(run_with(None, None, data_glob=["x"])) is None


def test_source_globs_and_overlaps_are_checked_before_reading(tmp_path: Path) -> None:
    from argonne_ds.data.loader import source_shards

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "s1.parquet").write_bytes(b"not read")
    sources = [{"name": "web", "data_glob": str(tmp_path / "a" / "*.parquet")},
               {"name": "code", "data_glob": str(tmp_path / "nothing" / "*.parquet")}]
    with pytest.raises(DataError, match="source 'code': --data-glob .* matched no files"):
        source_shards(plan_of(run_with(sources)))
    sources[1]["data_glob"] = [str(tmp_path / "b" / "*.parquet"), str(tmp_path / "a" / "s1*")]
    with pytest.raises(DataError, match="sources 'web' and 'code' both contain .*s1.parquet"):
        source_shards(plan_of(run_with(sources)))


def test_phases_round_trip_through_the_written_run_config(tmp_path: Path) -> None:
    from argonne_ds.run_options import load_file

    run = run_with(TWO, [{"name": "stable", "start": 0},
                         {"name": "anneal", "start": 8, "weights": {"code": 1}, "decay": "1-sqrt"}])
    run.write(tmp_path / "run.yaml")
    again = from_dict({s: v for s, v in load_file(tmp_path / "run.yaml").items()})
    assert plan_of(again) == plan_of(run)
    plan = plan_of(run)
    assert isinstance(plan, Plan) and plan.names == ("web", "code")
    assert plan.phases[1].weights == {"web": 0.0, "code": 1.0}
    assert [plan.phase_at(s) for s in (1, 8, 9, 100)] == [0, 0, 1, 1]


# ---- the learning rate --------------------------------------------------------------------------

def formula(i: int, peak: float, floor: float, warmup: int, start: int, end: int,
            shape: str) -> float:
    if i < warmup:
        return floor + (peak - floor) * i / warmup
    if i < start:
        return peak
    if i >= end:
        return floor
    x = (i - start + 1) / (end - start)
    f = {"linear": 1 - x, "cosine": (1 + math.cos(math.pi * x)) / 2, "1-sqrt": 1 - math.sqrt(x)}
    return floor + (peak - floor) * f[shape]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_learning_rate_is_the_formula(shape: str) -> None:
    run = run_with(TWO, [{"name": "stable"}, {"name": "anneal", "start": 30, "decay": shape},
                         {"name": "cool", "start": 45}])
    run.train.learning_rate, run.train.min_learning_rate, run.train.warmup_steps = 1e-3, 1e-5, 5
    lr = wsd_shape(run, plan_of(run), 60)
    assert lr == LRShape(1e-3, 1e-5, 5, 30, 45, shape)

    class Opt:
        param_groups = [{"lr": 0.0}, {"lr": 0.0}]

    sched = WSDSchedule(Opt(), lr)
    sched.step(0)
    for i in range(60):
        want = formula(i, 1e-3, 1e-5, 5, 30, 45, shape)
        assert sched.get_lr() == pytest.approx([want, want], rel=1e-12, abs=0)
        assert Opt.param_groups[1]["lr"] == sched.get_lr()[0]
        sched.step()
    assert formula(44, 1e-3, 1e-5, 5, 30, 45, shape) == pytest.approx(1e-5)  # the floor at last
    restored = WSDSchedule(Opt(), lr)
    restored.load_state_dict(sched.state_dict())
    assert restored.get_lr() == sched.get_lr()


def test_wsd_without_a_decay_phase_and_cosine_stays_deepspeeds() -> None:
    run = run_with(TWO)
    assert wsd_shape(run, plan_of(run), 100) is None  # DeepSpeed's WarmupCosineLR
    run.train.lr_schedule = "wsd"
    assert wsd_shape(run, plan_of(run), 100).decay_start == 80  # decay_fraction 0.2
    run.train.decay_steps, run.train.warmup_steps = 0, 5  # a trunk: the peak to the end
    shape = wsd_shape(run, plan_of(run), 100)
    assert shape(99) == run.train.learning_rate
    two = run_with(TWO, [{"name": "a", "decay": "linear"}, {"name": "b", "start": 5,
                                                            "decay": "cosine"}])
    with pytest.raises(ConfigError, match="phases 'a' and 'b' both decay"):
        wsd_shape(two, plan_of(two), 10)


def test_random_weights_keep_the_bound_over_phases() -> None:
    rng = random.Random(7)
    for _ in range(20):
        n = rng.randint(2, 6)
        spans, start = [], 0
        for p in range(3):
            w = [rng.choice([0, rng.random()]) for _ in range(n)]
            w[rng.randrange(n)] += 0.5
            spans.append(Span(f"p{p}", start, tuple(exact_weights(w)[0])))
            start += rng.randint(1, 400) * 4
        blend = Blend(spans)
        end = start + 2000
        src, _ = blend.locate(0, end)
        bounds = [s.start for s in spans] + [end]
        for p, span in enumerate(spans):
            share = np.array(span.parts) / span.period
            for n_ in range(bounds[p] + 4, bounds[p + 1] + 1, 4):
                c = np.bincount(src[bounds[p]:n_], minlength=len(share))
                assert np.abs(c - share * (n_ - bounds[p])).max() < 1
