"""The blended iterator of several sources against one source: delivered tok/s, and the seek.

    python benchmarks/data_mixture.py [--work-dir DIR] [--shards 6] [--repeat 5]

The first --shards shards of benchmarks/corpus.py, cached with the Qwen tokenizer, read:

- as ONE source (`data_glob`: the plain iterator of before), and
- as THREE sources (the shards split in three, weights 0.5/0.3/0.2, a stable and an anneal
  phase, data/mixture.py's blend),

by `build_data_iterator` (block 4096, micro-batch 8, one rank, shuffle_window 1024, warm page
cache) for the same number of steps: tok/s counts the input tokens delivered. Goal (issue 17):
three sources at least 0.9x one.

Seek: a fresh iterator, `load_state_dict` at global sample 0 and at sample 10**9 (every source
many epochs in), then the first batch: the median of --seeks each. The blend is a table lookup
per sample (a period of the exact weights), so the ratio should be ~1 (goal: at most 1.2x).

Prints figures; not a test. Before each timed part it waits for other processes to go quiet.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus  # noqa: E402
from data_prepare import qwen_dir, wait_for_idle  # noqa: E402

from argonne_ds.data.loader import DataConfig, build_data_iterator  # noqa: E402
from argonne_ds.phases import Plan, parse_phases, parse_sources  # noqa: E402

BLOCK, MICRO, SHUFFLE = 4096, 8, 1024


def plan_for(folder: Path, n: int) -> Plan:
    thirds = [list(range(n))[i::3] for i in range(3)]
    sources = parse_sources([
        {"name": name, "data_glob": [str(folder / f"shard_{k}.parquet") for k in ks],
         "weight": w} for name, ks, w in zip(("web", "code", "math"), thirds, (0.5, 0.3, 0.2))])
    phases = parse_phases([{"name": "stable", "start": 0},
                           {"name": "anneal", "start": 10**7,
                            "weights": {"web": 0.2, "code": 0.3, "math": 0.5}}], sources)
    return Plan(sources, phases)


def iterator(cfg: DataConfig, plan: Plan | None):
    it, _ = build_data_iterator(cfg, global_batch_size=MICRO, micro_batch_size=MICRO,
                                show_progress=False, plan=plan)
    return it


def throughput(cfg: DataConfig, plan: Plan | None, steps: int) -> float:
    it = iterator(cfg, plan)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
    dt = time.perf_counter() - t0
    assert x.shape == y.shape == (MICRO, BLOCK)
    return steps * MICRO * BLOCK / dt


def seek(cfg: DataConfig, plan: Plan | None, sample: int) -> float:
    it = iterator(cfg, plan)
    state = it.state_dict()
    if plan is not None:  # a checkpoint at `sample`: what the mixture saves there
        state["source"] = it.source.state_dict(sample)
    state |= {"samples": sample, "micro": 0}
    t0 = time.perf_counter()
    it.load_state_dict(state)
    next(it)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="/tmp/argonne-bench")
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeks", type=int, default=40)
    ap.add_argument("--max-wait-idle", type=float, default=300.0)
    args = ap.parse_args()
    work, tok = Path(args.work_dir), qwen_dir()
    folder = build_corpus(work, args.shards)
    shards = [str(folder / f"shard_{k}.parquet") for k in range(args.shards)]
    cache = work / "cache-mixture"
    exe = Path(sys.executable).parent / "argonne-ds"
    subprocess.run([str(exe), "prepare", "--data-glob", *shards, "--tokenizer-path", tok,
                    "--cache-dir", str(cache), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    one = DataConfig(shards, tokenizer_path=tok, cache_dir=str(cache), block_size=BLOCK,
                     shuffle_window=SHUFFLE, seed=1234)
    mixed = DataConfig([], tokenizer_path=tok, cache_dir=str(cache), block_size=BLOCK,
                       shuffle_window=SHUFFLE, seed=1234)
    plan = plan_for(folder, args.shards)
    iterator(mixed, plan)  # the per-source indexes, built once (not timed)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}")
    print(f"# {args.shards} corpus shards; block {BLOCK}, micro-batch {MICRO}, shuffle_window "
          f"{SHUFFLE}, {args.steps} steps per run, warm page cache")
    rates: dict[str, list[float]] = {"one source": [], "three sources": []}
    for _ in range(args.repeat):  # interleaved: drift hits both alike
        wait_for_idle(args.max_wait_idle)
        rates["one source"].append(throughput(one, None, args.steps))
        rates["three sources"].append(throughput(mixed, plan, args.steps))
    print("\n| iterator | tok/s median (min-max) |\n|---|---:|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r) / 1e6:,.0f} M ({min(r) / 1e6:,.0f}-"
              f"{max(r) / 1e6:,.0f} M) |")
    ratio = statistics.median(rates["three sources"]) / statistics.median(rates["one source"])
    print(f"\nthree sources / one source: {ratio:.2f}x (goal >= 0.9)")

    print(f"\n| seek: load_state_dict + first batch, median of {args.seeks} | sample 0 | sample "
          "10**9 | 10**9 / 0 |\n|---|---:|---:|---:|")
    for name, cfg, p in (("one source", one, None), ("three sources", mixed, plan)):
        wait_for_idle(args.max_wait_idle)
        times: dict[int, list[float]] = {0: [], 10**9: []}
        for k in range(args.seeks):
            for where in (0, 10**9) if k % 2 else (10**9, 0):
                times[where].append(seek(cfg, p, where))
        a, b = (statistics.median(times[w]) for w in (0, 10**9))
        print(f"| {name} | {a * 1e3:.3f} ms | {b * 1e3:.3f} ms | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
