"""The training iterator reading the token cache: delivered tok/s, and the resume seek.

    python benchmarks/data_iterator.py [--work-dir DIR] [--shards 16] [--repeat 3]

Builds one large shard (the first --shards shards of benchmarks/corpus.py in one parquet file,
400 MB of text and ~139 M tokens by default) and its cache with `argonne-ds prepare`, then:

- throughput: `build_data_iterator` (block 4096, micro-batch 8, one rank) over a whole epoch,
  (input_ids, labels) int64 torch tensors per step, with shuffle_window 0 and 1024; tok/s counts
  the input tokens delivered (micro-batch x block);
- resume seek: a fresh iterator, then `load_state_dict` at a sample near the START (first 2%)
  and near the END (last 2%) of that one shard, and the first batch: medians for both, with the
  shard's pages in the page cache (warm) and evicted from it (cold: posix_fadvise DONTNEED on
  the token file, which touches no other file; then each seek is one random disk read).
  TokenStore.read is a bisect plus a memmap slice, so the ratio should be ~1.

Prints figures; not a test. Before each timed part it waits for other processes to go quiet
(2 shared cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus  # noqa: E402
from data_prepare import qwen_dir, wait_for_idle  # noqa: E402

from argonne_ds.data.loader import DataConfig, build_data_iterator  # noqa: E402

BLOCK, MICRO = 4096, 8


def big_shard(work: Path, n_shards: int) -> Path:
    """One parquet file holding the corpus' first n shards (their row groups as they are)."""
    out = work / f"big-{n_shards}" / "big_shard.parquet"
    if not out.is_file():
        folder = build_corpus(work, n_shards)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        schema = pq.read_schema(folder / "shard_0.parquet")
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for k in range(n_shards):
                writer.write_table(pq.read_table(folder / f"shard_{k}.parquet"),
                                   row_group_size=1000)
        os.replace(tmp, out)
    return out


def config(shard: Path, cache: Path, tok: str, shuffle: int) -> DataConfig:
    return DataConfig([str(shard)], tokenizer_path=tok, cache_dir=str(cache), block_size=BLOCK,
                      shuffle_window=shuffle, seed=1234)


def throughput(cfg: DataConfig) -> tuple[float, int]:
    it, _ = build_data_iterator(cfg, global_batch_size=MICRO, micro_batch_size=MICRO,
                                show_progress=False)
    steps = it.blocks_per_epoch // MICRO
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
    dt = time.perf_counter() - t0
    assert x.shape == y.shape == (MICRO, BLOCK)
    return steps * MICRO * BLOCK / dt, steps


def load_into_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seek_once(cfg: DataConfig, sample: int, token_file: Path, cold: bool) -> float:
    it, _ = build_data_iterator(cfg, global_batch_size=MICRO, micro_batch_size=MICRO,
                                show_progress=False)
    state = it.state_dict() | {"samples": sample, "micro": 0}  # a checkpoint taken at `sample`
    if cold:
        evict(token_file)
    t0 = time.perf_counter()
    it.load_state_dict(state)
    next(it)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="/tmp/argonne-bench")
    ap.add_argument("--shards", type=int, default=16, help="corpus shards in the big shard")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seeks", type=int, default=40, help="seeks per position and cache state")
    ap.add_argument("--max-wait-idle", type=float, default=300.0,
                    help="before each timed part, wait up to this long for a quiet machine")
    args = ap.parse_args()
    work, tok = Path(args.work_dir), qwen_dir()
    shard = big_shard(work, args.shards)
    cache = work / f"cache-big-{args.shards}"
    exe = Path(sys.executable).parent / "argonne-ds"
    subprocess.run([str(exe), "prepare", "--data-glob", str(shard), "--tokenizer-path", tok,
                    "--cache-dir", str(cache), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    (token_file,) = (cache / "tokens").glob("*.bin")
    n_tokens = token_file.stat().st_size // 4
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}")
    print(f"# one shard: {shard} ({shard.stat().st_size / 1e6:,.0f} MB parquet), its cache "
          f"file {n_tokens / 1e6:,.1f} M tokens ({token_file.stat().st_size / 1e6:,.0f} MB)")

    print(f"\n| iterator (block {BLOCK}, micro-batch {MICRO}, warm page cache) | tok/s median "
          "(min-max) | steps |\n|---|---:|---:|")
    for shuffle in (0, 1024):
        runs = []
        for _ in range(args.repeat):
            wait_for_idle(args.max_wait_idle)
            load_into_page_cache(token_file)
            runs.append(throughput(config(shard, cache, tok, shuffle)))
        rates = [r for r, _ in runs]
        print(f"| shuffle_window {shuffle:<4} | {statistics.median(rates) / 1e6:,.0f} M "
              f"({min(rates) / 1e6:,.0f}-{max(rates) / 1e6:,.0f} M) | {runs[0][1]:,} |")

    n_epoch = (n_tokens - 1) // BLOCK
    edge = n_epoch // 50  # positions drawn from the first and the last 2% of the shard
    print(f"\n| resume seek: load_state_dict + first batch, median of {args.seeks} | start "
          f"(samples < {edge:,}) | end (samples > {n_epoch - edge:,}) | end / start |\n"
          "|---|---:|---:|---:|")
    rng = random.Random(0)
    for shuffle in (0, 1024):
        cfg = config(shard, cache, tok, shuffle)
        for cold in (False, True):
            wait_for_idle(args.max_wait_idle)
            load_into_page_cache(token_file)  # warm: all of it; cold: evicted before each seek
            times: dict[str, list[float]] = {"start": [], "end": []}
            for k in range(args.seeks):  # interleaved, alternating: drift hits both alike
                where = {"start": rng.randrange(edge),
                         "end": n_epoch - MICRO - rng.randrange(edge)}
                for pos in ("start", "end") if k % 2 else ("end", "start"):
                    times[pos].append(seek_once(cfg, where[pos], token_file, cold))
            a, b = (statistics.median(times[p]) for p in ("start", "end"))
            print(f"| shuffle_window {shuffle}, {'cold' if cold else 'warm'} page cache | "
                  f"{a * 1e3:.3f} ms | {b * 1e3:.3f} ms | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
