"""Weighted blending of named sources, a pure function of (weights, phases, index).

Each phase's weights are exact fractions a_s / D (phases.exact_weights). Inside a phase, sample i
goes to the source that Tijdeman's chairman-assignment rule picks: among the sources whose
deficit w_s*(i+1) - C_s(i) is at least 1/(2n-2), the one whose next "deadline"
(C_s + 1 - 1/(2n-2)) / w_s comes first. Its cumulative count C_s then stays within
1 - 1/(2n-2) < 1 sample of w_s * i at every sample of the phase (Tijdeman 1980), so the counts
return to exactly a_s after D samples and the assignment repeats with period D. One period's
choices and running counts are tabulated once (<= 65,536 entries), so any global sample is a few
array lookups away: resume and seek cost the same at sample 10**9 as at sample 0, and nothing of
the blend is replayed.

Sample g of phase p (which starts at sample S_p) is therefore block
    base_s(p) + (g - S_p) // D * a_s + count_s((g - S_p) % D)
of source s, where base_s(p) counts what the earlier phases drew from s. Each source keeps its
own epochs and shuffle (a CachedBlocks or StreamedBlocks of its own). A phase's samples depend
only on where it and the phases before it start and on their weights: appending a phase, or
changing one that has not started, moves nothing already drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from argonne_ds.data import DataError

logger = logging.getLogger(__name__)
CHUNK = 4096  # samples located at once


@lru_cache(maxsize=32)
def period_table(parts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(choice, counts) for one period of D = sum(parts) samples: choice[i] is the source of
    sample i; counts[i, s] how many of samples [0, i) went to s (counts[D] = parts)."""
    n, d = len(parts), sum(parts)
    choice = np.zeros(d, np.int64)
    counts = np.zeros((d + 1, n), np.int64)
    live = [s for s in range(n) if parts[s]]
    if len(live) == 1:
        choice[:] = live[0]
        counts[1:, live[0]] = np.arange(1, d + 1)
        return choice, counts
    k = 2 * len(live) - 2  # the rule's 1/(2n-2), over the sources that draw at all
    c = [0] * n
    for t in range(1, d + 1):
        best, best_num, best_den = -1, 0, 1
        for s in live:
            # eligible: a_s*t/D - c_s >= 1/k  <=>  k*(a_s*t - D*c_s) >= D
            if k * (parts[s] * t - d * c[s]) < d:
                continue
            # deadline ~ (k*(c_s+1) - 1) / a_s; the earliest wins, the lower index on a tie
            num, den = k * (c[s] + 1) - 1, parts[s]
            if best < 0 or num * best_den < best_num * den:
                best, best_num, best_den = s, num, den
        choice[t - 1] = best
        c[best] += 1
        counts[t] = c
    if c != list(parts):  # the theorem guarantees it; a table that did not close is a bug
        raise AssertionError(f"blend period did not close: {c} != {parts}")
    return choice, counts


@dataclass(frozen=True)
class Span:
    """One phase in samples: it starts at global sample `start`; `parts` / `period`: weights."""

    name: str
    start: int
    parts: tuple[int, ...]

    @property
    def period(self) -> int:
        return sum(self.parts)


class Blend:
    """Global sample -> (source, that source's sample index), for phases given in samples."""

    def __init__(self, spans: Sequence[Span]) -> None:
        if not spans or spans[0].start != 0:
            raise ValueError("the first phase starts at sample 0")
        self.spans = list(spans)
        self.n = len(spans[0].parts)
        self.starts = np.array([s.start for s in spans], np.int64)
        # What each phase starts with: the counts drawn by the phases before it.
        self.bases = np.zeros((len(spans), self.n), np.int64)
        for i in range(1, len(spans)):
            self.bases[i] = self.bases[i - 1] + self._counts_in(i - 1, spans[i].start
                                                                - spans[i - 1].start)

    def _counts_in(self, p: int, i: int) -> np.ndarray:
        """Samples per source among the first i of phase p."""
        span = self.spans[p]
        q, r = divmod(i, span.period)
        _, counts = period_table(span.parts)
        return q * np.asarray(span.parts, np.int64) + counts[r]

    def phase_of(self, g: int) -> int:
        return int(np.searchsorted(self.starts, g, side="right")) - 1

    def counts(self, g: int) -> np.ndarray:
        """Samples drawn from each source by global samples [0, g)."""
        p = self.phase_of(max(g - 1, 0)) if g else 0
        return self.bases[p] + self._counts_in(p, g - self.spans[p].start)

    def locate(self, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, source sample) of global samples [first, first + n), vectorised."""
        g = np.arange(first, first + n, dtype=np.int64)
        phase = np.searchsorted(self.starts, g, side="right") - 1
        src = np.empty(n, np.int64)
        k = np.empty(n, np.int64)
        for p in np.unique(phase):
            sel = phase == p
            span = self.spans[p]
            choice, counts = period_table(span.parts)
            q, r = np.divmod(g[sel] - span.start, span.period)
            s = choice[r]
            src[sel] = s
            k[sel] = self.bases[p][s] + q * np.asarray(span.parts, np.int64)[s] + counts[r, s]
        return src, k


class Mixture:
    """Blocks from several named sources, blended (the `source` of a ResumableShardIterator)."""

    def __init__(self, names: Sequence[str], sources: Sequence[Any], blend: Blend,
                 records: Sequence[dict[str, Any]] | None = None,
                 global_batch: int | Sequence[int] = 1) -> None:
        """`records`: each phase as the run config gives it (phases.Phase.record), kept in every
        checkpoint once the phase has started; `global_batch`: samples per step (per phase where
        phases change it), for messages."""
        self.names, self.sources, self.blend = list(names), list(sources), blend
        self.records = [dict(r) for r in records] if records else [
            {"name": s.name} for s in blend.spans]
        self.G = [global_batch] * len(blend.spans) if isinstance(global_batch, int) else \
            list(global_batch)
        # Sources and blocks of the next CHUNK samples, computed at once (a lookup per sample
        # costs more in numpy calls than the block read itself).
        self._lo, self._src, self._k = 0, [], []
        self._streams = any(s.mode == "stream" for s in sources)
        modes = {s.mode for s in sources}
        self.mode = modes.pop() if len(modes) == 1 else "mixed"
        self.n_epoch = None  # each source has its own epochs (epochs())

    def sample(self, g: int) -> np.ndarray:
        src, k = self.blend.locate(g, 1)
        return self.sources[int(src[0])].sample(int(k[0]))

    def samples(self, first: int, n: int) -> list[np.ndarray]:
        a = first - self._lo
        if a < 0 or a + n > len(self._src):
            src, k = self.blend.locate(first, max(n, CHUNK))
            self._lo, self._src, self._k, a = first, src.tolist(), k.tolist(), 0
        return [self.sources[s].sample(i) for s, i in zip(self._src[a:a + n], self._k[a:a + n])]

    def release(self, g: int) -> None:
        if not self._streams:  # the cache forgets nothing: any block is a seek away
            return
        for source, k in zip(self.sources, self.blend.counts(g).tolist()):
            source.release(k)

    def step_at(self, g: int) -> int:
        """The optimizer step that ends at global sample g (a phase boundary or inside one)."""
        p = self.blend.phase_of(g - 1) if g else 0
        start = int(self.records[p].get("start") or 0)
        return start + (g - self.blend.spans[p].start) // self.G[p]

    def epochs(self, g: int) -> dict[str, float]:
        """Passes over each source by global sample g (None where a stream's size is unknown)."""
        return {name: (s.passes(k) if hasattr(s, "passes") else
                       k / s.n_epoch if s.n_epoch else None)
                for name, s, k in zip(self.names, self.sources, self.blend.counts(g).tolist())}

    def started(self, g: int) -> list[dict[str, Any]]:
        """The phases that have drawn samples before global sample g, with their first sample."""
        return [{**r, "start_sample": span.start} for r, span in zip(self.records,
                                                                      self.blend.spans)
                if span.start < g]

    def state_dict(self, g: int) -> dict[str, Any]:
        counts = self.blend.counts(g).tolist()
        return {"phases": self.started(g),
                "mixture": {name: {"samples": k, "position": s.state_dict(k)}
                            for name, s, k in zip(self.names, self.sources, counts)}}

    def _check_phases(self, saved: list[dict[str, Any]], g: int) -> None:
        """A phase that had started by the checkpoint cannot change; one not started may."""
        for i, was in enumerate(saved):
            now = self.records[i] if i < len(self.records) else None
            if now is None or _norm(now) != _norm(was):
                change = "is gone" if now is None else "changed: " + ", ".join(
                    f"{k} {_norm(was).get(k)!r} -> {_norm(now).get(k)!r}"
                    for k in _norm(was) | _norm(now) if _norm(was).get(k) != _norm(now).get(k))
                raise DataError(
                    f"phase {was['name']!r} started at step {was.get('start')} before this "
                    f"checkpoint and {change}; a started phase cannot change (its data was "
                    "drawn): restore it as it was and append a new phase to change course")
        for r, span in zip(self.records[len(saved):], self.blend.spans[len(saved):]):
            if span.start < g:
                raise DataError(
                    f"phase {r['name']!r} starts at step {r.get('start')}, before this "
                    f"checkpoint's step {self.step_at(g)}: a new phase can only start at or after "
                    "the step it is added at")

    def load_state_dict(self, state: dict[str, Any], g: int) -> None:
        saved = state.get("mixture")
        if saved is not None:
            self._check_phases(state.get("phases", []), g)
        if saved is None:
            raise DataError("the checkpoint was written by a one-source run (data.data_glob); "
                            "this run has data.sources: resume it with its data_glob, or start "
                            "the mixture in a new --output-dir")
        for name, source, k in zip(self.names, self.sources, self.blend.counts(g).tolist()):
            entry = saved.get(name)
            if entry is None:
                if k:
                    raise DataError(f"source {name!r} is new since the checkpoint, yet the "
                                    "phases draw from it before the checkpoint's sample: add "
                                    "it in a phase that starts later")
                continue
            if int(entry["samples"]) != k:
                raise DataError(f"source {name!r}: the checkpoint drew {entry['samples']} "
                                f"samples from it, these phases {k}: a started phase changed")
            if entry["position"] or source.mode == "stream":
                source.load_state_dict(entry["position"], k)


def _norm(record: dict[str, Any] | None) -> dict[str, Any]:
    """A phase record as compared on resume: zero weights dropped (a source added later)."""
    if record is None:
        return {}
    out = {k: v for k, v in record.items() if k != "start_sample"}
    out["weights"] = {k: v for k, v in (record.get("weights") or {}).items() if v}
    return out
