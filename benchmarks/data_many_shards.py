"""Per-rank start-up from a prepared token cache of many small shards: time to the first batch.

    python benchmarks/data_many_shards.py [--work-dir DIR] [--scales 10000,100000]
        [--readers 1,4] [--repeat 3] [--compare-code DIR]

Writes 100k tiny synthetic parquet shards (two short documents each, 10 folders of 10k; the 10k
list is the first folder), prepares one token cache for both lists (Qwen tokenizer, HF
`tokenizers`; minutes, with progress), then:

- readers: R processes (ranks) started together, each, once imported, timing
  `build_data_iterator` (discovery, tokenizer, cache index, iterator) + the first batch, with
  its wall and CPU seconds and its open file descriptors after the batch; median over --repeat
  of the slowest reader; "busy before": the most CPU other processes used in the 2 s before a
  run (the script waits up to --max-wait-idle for < 10%). --compare-code DIR runs the readers
  from another checkout (e.g. the last commit's: `git archive HEAD | tar -x -C DIR`) for a
  before/after;
- reading speed: one reader over a whole epoch (block 64: every block crosses shards), in order
  and shuffled in one window (random access over all shards: the worst case for the bounded
  set of open token files), tok/s and the open descriptors at the end;
- where one reader's time goes at each scale: discovery's parts (glob, lstat and real path,
  natural sort; and what the parts it replaced cost), the shard-list fingerprint, the
  tokenizer, the index read, the iterator and the first batch, plus what the locked path would
  pay (shard keys and per-shard entries).

Prints figures; not a test. Before each timed run it waits for the machine to go quiet.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_prepare import qwen_dir, wait_for_idle  # noqa: E402

PER_FOLDER = 10_000
BLOCK, MICRO = 64, 8
WORDS = ("the of and to in is was for on that with as by at from his her it an are were be this "
         "which or had not but have one all their they when there been who would").split()

# One reader (rank): imports, says "ready", waits for "go", then times its start-up.
READER = r"""
import json, os, resource, sys, time
sys.stdout.reconfigure(line_buffering=True)
from argonne_ds.data.loader import DataConfig, build_data_iterator
import argonne_ds.data.stream  # torch: imported before the clock starts, as in a trainer
cfg = DataConfig(json.loads(sys.argv[1]), tokenizer_path=sys.argv[2], cache_dir=sys.argv[3],
                 block_size=int(sys.argv[4]), encoder="tokenizers")
print("ready")
sys.stdin.readline()
c0, t0 = time.process_time(), time.perf_counter()
it, _ = build_data_iterator(cfg, global_batch_size=int(sys.argv[5]) * int(sys.argv[6]),
                            micro_batch_size=int(sys.argv[5]), dp_rank=int(sys.argv[7]),
                            dp_world=int(sys.argv[6]), show_progress=False)
t1 = time.perf_counter()
x, _ = next(it)
t2 = time.perf_counter()
out = {"build": t1 - t0, "batch": t2 - t1, "wall": t2 - t0, "cpu": time.process_time() - c0,
       "fds": len(os.listdir("/proc/self/fd"))}
if sys.argv[8] != "0":  # then read the whole epoch (window sys.argv[8]; 1 = in order)
    from argonne_ds.data.stream import CachedBlocks, ResumableShardIterator
    index = it.cache_index
    del it  # its open token files with it (the old code held one per shard)
    it = ResumableShardIterator(CachedBlocks(index, cfg.block_size, 1, int(sys.argv[8])),
                                global_batch_size=int(sys.argv[5]),
                                micro_batch_size=int(sys.argv[5]))
    steps = it.blocks_per_epoch // int(sys.argv[5])
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    out["tok_s"] = steps * int(sys.argv[5]) * cfg.block_size / (time.perf_counter() - t0)
    out["fds_epoch"] = len(os.listdir("/proc/self/fd"))
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def make_shards(work: Path, n: int) -> list[str]:
    """Folders d0..d(n/10k - 1) of 10k shards each; shard k depends on k only. Returns globs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0, made = time.perf_counter(), 0
    for f in range(n // PER_FOLDER):
        folder = work / "shards" / f"d{f}"
        done = folder / ".complete"
        if done.is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(f * PER_FOLDER, (f + 1) * PER_FOLDER):
            rng = random.Random(k)
            texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "."
                     for _ in range(2)]
            pq.write_table(pa.table({"text": texts}), folder / f"s_{k}.parquet")
            made += 1
        done.touch()
        print(f"[shards] {folder}: {(f + 1) * PER_FOLDER:,} written "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if made:
        print(f"[shards] wrote {made:,} shards in {time.perf_counter() - t0:.1f} s", flush=True)
    return [str(work / "shards" / f"d{f}" / "*.parquet") for f in range(n // PER_FOLDER)]


def prepare(globs: list[str], cache: Path, tok: str) -> None:
    from argonne_ds.data.cache import prepare_cache
    from argonne_ds.data.discovery import discover_shards
    from argonne_ds.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    index = prepare_cache(discover_shards(globs), load_tokenizer(tok), cache,
                          encoder="tokenizers", show_progress=True)
    print(f"[prepare] {len(index.entries):,} shards, {index.n_tokens:,} tokens: "
          f"{index.stats['tokenized_now']:,} tokenized now, {time.perf_counter() - t0:.1f} s",
          flush=True)


def run_readers(globs: list[str], tok: str, cache: Path, n: int, code: str | None,
                epoch_window: int = 0) -> list[dict]:
    """n readers started together; each one's figures. Raises RuntimeError with the last line
    of a failed reader's error."""
    env = os.environ | {"PYTHONPATH": code or str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen(
        [sys.executable, "-c", READER, json.dumps(globs), tok, str(cache), str(BLOCK),
         str(MICRO), str(n), str(r), str(epoch_window)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=code)
        for r in range(n)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"reader failed to start: {p.communicate()[1][-3000:]}")
    for p in procs:  # all at once, as ranks do
        p.stdin.write("go\n")
        p.stdin.flush()
    out, failed = [], ""
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode:
            failed = (stderr.strip().splitlines() or ["?"])[-1]
        else:
            out.append(json.loads(stdout.splitlines()[-1]))
    if failed:
        raise RuntimeError(failed)
    return out


def breakdown(globs: list[str], tok_dir: str, cache: Path) -> list[tuple[str, float]]:
    """One reader's start-up, part by part (discover_shards re-done in its parts)."""
    from argonne_ds.data import cache as cache_mod
    from argonne_ds.data.discovery import discover_shards, natural_key
    from argonne_ds.data.discovery import shard_list_fingerprint as fingerprint
    from argonne_ds.data.loader import DataConfig, build_data_iterator
    from argonne_ds.data.stream import CachedBlocks
    from argonne_ds.data.tokenizer import _LOADED, load_tokenizer

    rows, clock = [], time.perf_counter

    def timed(name: str, fn):
        t0 = clock()
        value = fn()
        rows.append((name, clock() - t0))
        return value

    paths = timed("discovery: glob", lambda: [p for g in globs for p in glob.glob(g)])
    real_dirs: dict[str, str] = {}

    def lstat_and_real_path(p: str) -> tuple[str, os.stat_result]:
        folder, name = os.path.split(p)
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(folder)
        return os.path.join(real_dirs[folder], name), os.lstat(p)

    found = timed("discovery: lstat + real path (the folder's, once)",
                  lambda: [lstat_and_real_path(p) for p in paths])
    timed("discovery: natural sort (names; full paths only on ties)",
          lambda: sorted(natural_key(os.path.basename(p)) for p, _ in found))
    timed("  before: isfile + realpath per file", lambda: {
        os.path.realpath(p): p for p in paths if os.path.isfile(p)})
    timed("  before: natural sort on name and full path", lambda: sorted(
        paths, key=lambda p: (natural_key(os.path.basename(p)), natural_key(p))))
    timed("  before: a second stat per file", lambda: [os.stat(p) for p in paths])
    shards = timed("discover_shards (all of it, as it is now)", lambda: discover_shards(globs))
    timed("shard-list fingerprint", lambda: fingerprint(shards))
    _LOADED.clear()
    tok = timed("tokenizer (load + fingerprint)", lambda: load_tokenizer(tok_dir))
    index = timed("load_cache (fingerprint, index read, checks)",
                  lambda: cache_mod.load_cache(shards, tok, cache, encoder="tokenizers",
                                               show_progress=False))
    timed("CachedBlocks (TokenStore from the index)", lambda: CachedBlocks(index, BLOCK, 1, 0))
    cfg = DataConfig(globs, tokenizer_path=tok_dir, cache_dir=str(cache), block_size=BLOCK,
                     encoder="tokenizers")
    it = timed("build_data_iterator (all of it)", lambda: build_data_iterator(
        cfg, global_batch_size=MICRO, micro_batch_size=MICRO, show_progress=False)[0])
    timed("first batch", lambda: next(it))
    # What the locked path pays on top (not on a complete cache any more).
    keys = timed("(locked path) shard keys", lambda: [
        cache_mod.shard_key(s, tok, "text") for s in shards])
    timed("(locked path) per-shard entries read", lambda: [
        cache_mod._read_entry(cache / "tokens", k) for k in keys])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="/tmp/argonne-bench-many")
    ap.add_argument("--scales", default="10000,100000")
    ap.add_argument("--readers", default="1,4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare-code", default=None,
                    help="also run the readers from this checkout of the package (before/after)")
    ap.add_argument("--max-wait-idle", type=float, default=120.0)
    ap.add_argument("--parts", default="startup,epoch,breakdown")
    args = ap.parse_args()
    scales = sorted(int(s) for s in args.scales.split(","))
    readers = [int(r) for r in args.readers.split(",")]
    work, tok = Path(args.work_dir), qwen_dir()
    if any(s % PER_FOLDER for s in scales):
        raise SystemExit(f"--scales: multiples of {PER_FOLDER}")
    make_shards(work, max(scales))
    cache = work / "cache"
    for n in scales:
        prepare(make_shards(work, n), cache, tok)

    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"\n# {cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB, Python "
          f"{platform.python_version()}, RLIMIT_NOFILE "
          f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; load average "
          f"{os.getloadavg()[0]:.2f}")
    parts = args.parts.split(",")
    codes = [("this", None)] + ([("compare", args.compare_code)] if args.compare_code else [])
    if "startup" in parts:
        print(f"# each reader: build_data_iterator (block {BLOCK}, micro-batch {MICRO}, its rank "
              "of R) + the first batch, timed after its imports; median of "
              f"{args.repeat} of the slowest reader\n")
        print("| code | shards | readers | wall s (slowest) | build s | first batch ms | "
              "CPU s per reader | open fds | peak RSS MB | busy before |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in scales if "startup" in parts else []:
        globs = make_shards(work, n)
        for label, code in codes:
            for r in readers:
                runs, busy = [], 0.0
                try:
                    for _ in range(args.repeat):
                        busy = max(busy, wait_for_idle(args.max_wait_idle))
                        runs.append(run_readers(globs, tok, cache, r, code))
                except RuntimeError as e:
                    print(f"| {label} | {n:,} | {r} | failed: {str(e)[:120]} ||||||", flush=True)
                    continue
                slow = [max(run, key=lambda x: x["wall"]) for run in runs]
                med = sorted(slow, key=lambda x: x["wall"])[len(slow) // 2]
                print(f"| {label} | {n:,} | {r} | {med['wall']:.2f} | {med['build']:.2f} | "
                      f"{med['batch'] * 1e3:.1f} | "
                      f"{statistics.median(x['cpu'] for run in runs for x in run):.2f} | "
                      f"{med['fds']} | {med['rss_mb']:.0f} | {busy:.0%} |", flush=True)

    if "epoch" in parts:
        print(f"\n| reading a whole epoch, one reader (block {BLOCK}, micro-batch {MICRO}) | "
              "shards | tok/s median (min-max) | open fds at the end |\n|---|---:|---:|---:|")
    for n in scales if "epoch" in parts else []:
        globs = make_shards(work, n)
        for label, code in codes:
            for window in (1, 1 << 30):  # in order; one window over the epoch (random access)
                try:
                    runs = []
                    for _ in range(args.repeat):
                        wait_for_idle(args.max_wait_idle)
                        runs.append(run_readers(globs, tok, cache, 1, code, window)[0])
                except RuntimeError as e:
                    print(f"| {label}, {'in order' if window == 1 else 'shuffled'} | {n:,} | "
                          f"failed: {str(e)[:120]} ||", flush=True)
                    continue
                rates = [x["tok_s"] for x in runs]
                print(f"| {label}, {'in order' if window == 1 else 'shuffled (one window)'} | "
                      f"{n:,} | {statistics.median(rates) / 1e6:.1f} M ({min(rates) / 1e6:.1f}-"
                      f"{max(rates) / 1e6:.1f} M) | {runs[0]['fds_epoch']} |", flush=True)

    for n in scales if "breakdown" in parts else []:
        wait_for_idle(args.max_wait_idle)
        rows = breakdown(make_shards(work, n), tok, cache)
        print(f"\n| one reader, {n:,} shards: where the time goes | s |\n|---|---:|")
        for name, dt in rows:
            print(f"| {name} | {dt:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
