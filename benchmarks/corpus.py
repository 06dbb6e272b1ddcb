"""The benchmark corpus: parquet shards of real text mixed with synthetic text full of unique
pretokens, deterministic from a seed, cached under a work directory.

Why the mix: the embedded sample (data/sample, 20 MB) replicated alone would be a flattering
benchmark, since after its first pass every pretoken hits the tokenizer's caches. Real corpora
keep producing new pretokens (numbers, identifiers, URLs, names), which miss every cache and make
the per-worker caches grow. So each shard is, by text bytes, about half real documents and half
synthetic ones:

- real: the sample's 2,638 documents (KJV, Shakespeare, Wikipedia, Python docs), each shard
  taking them in its own random order (replicas: their pretokens repeat across the corpus);
- synthetic: words drawn from the sample's word distribution (3.2 M words), with 15% of them
  replaced by a fresh random pretoken: alphanumeric ids, integers, decimals, hex hashes, URLs and
  e-mail addresses (e.g. `k3J9xqTb`, `48213907`, `3.14159`, `9f2c...`,
  `https://q8xk2.org/ab3d/4471`). They are new in every shard, so the number of distinct
  pretokens grows with the data, as in real corpora.

About 0.5% of the rows are null, empty or whitespace-only (the cache skips them). Shard k depends
only on (seed, k), so the 1x corpus is the first shards of the 4x corpus.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_GLOB = str(ROOT / "data" / "sample" / "*.parquet")
ALNUM = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
TLDS = np.array(["com", "org", "net", "io", "de", "edu"])
VERSION = 1  # bump when the generator changes: cached corpora are rebuilt


def sample_texts() -> list[str]:
    out: list[str] = []
    for p in sorted(glob.glob(SAMPLE_GLOB)):
        out += [t for t in pq.read_table(p, columns=["text"]).column(0).to_pylist() if t]
    if not out:
        raise SystemExit(f"no sample corpus at {SAMPLE_GLOB}")
    return out


def _alnum(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    return ALNUM[rng.integers(0, len(ALNUM), (n, width))].view(f"<U{width}").ravel()


def unique_pretokens(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random strings, most never seen before: ids, numbers, hashes, URLs, e-mails."""
    kind = rng.integers(0, 7, n)
    out = np.empty(n, dtype=object)
    for k in range(7):
        m = int((kind == k).sum())
        if not m:
            continue
        if k in (0, 1):  # identifiers of 8 or 12 mixed-case characters
            s = _alnum(rng, m, 8 + 4 * k)
        elif k == 2:  # integers
            s = rng.integers(0, 10**9, m).astype("U")
        elif k == 3:  # decimals
            s = np.char.add(np.char.add(rng.integers(0, 10**4, m).astype("U"), "."),
                            rng.integers(0, 10**6, m).astype("U"))
        elif k == 4:  # hex hashes
            s = np.array(list(rng.bytes(8 * m).hex()), dtype="<U1").view("<U16")
        elif k == 5:  # URLs
            s = np.char.add("https://", _alnum(rng, m, 6))
            s = np.char.add(np.char.add(s, "."), TLDS[rng.integers(0, len(TLDS), m)])
            s = np.char.add(np.char.add(s, "/"), _alnum(rng, m, 5))
            s = np.char.add(np.char.add(s, "/"), rng.integers(0, 10**5, m).astype("U"))
        else:  # e-mail addresses
            s = np.char.add(np.char.add(_alnum(rng, m, 7), "@"), _alnum(rng, m, 5))
            s = np.char.add(np.char.add(s, "."), TLDS[rng.integers(0, len(TLDS), m)])
        out[kind == k] = s.tolist()
    return out


def synthetic_docs(rng: np.random.Generator, words: np.ndarray, n_bytes: int,
                   unique_frac: float) -> list[str]:
    """Documents of about n_bytes in all: sample-distributed words, unique_frac of them replaced
    by fresh random pretokens, in lines of 5-25 words."""
    n_words = n_bytes // 6  # ~6 bytes per word and space in the sample
    w = words[rng.integers(0, len(words), n_words)]
    swap = rng.random(n_words) < unique_frac
    w[swap] = unique_pretokens(rng, int(swap.sum()))
    docs, i = [], 0
    doc_words = np.clip(rng.lognormal(6.2, 0.9, n_words // 100 + 10).astype(int), 20, 20_000)
    for size in doc_words:
        if i >= n_words:
            break
        part = w[i:i + size].tolist()
        i += size
        line_ends = np.cumsum(rng.integers(5, 26, len(part) // 5 + 2))
        lines = [" ".join(part[a:b]) for a, b in zip(np.r_[0, line_ends[:-1]], line_ends)
                 if a < len(part)]
        docs.append("\n".join(lines))
    return docs


def write_shard(path: Path, k: int, seed: int, shard_bytes: int, real: list[str],
                words: np.ndarray, unique_frac: float = 0.15, row_group_rows: int = 1000) -> int:
    """Shard k: half real documents, half synthetic, shuffled, some blank rows. Returns its
    text bytes."""
    rng = np.random.default_rng([seed, k])
    docs: list[str | None] = synthetic_docs(rng, words, shard_bytes // 2, unique_frac)
    size = sum(len(d) for d in docs if d)
    order = rng.permutation(len(real))
    j = 0
    while size < shard_bytes:
        doc = real[order[j % len(order)]]
        docs.append(doc)
        size += len(doc)
        j += 1
    docs = [docs[i] for i in rng.permutation(len(docs))]
    for _ in range(max(3, len(docs) // 200)):  # null, empty, whitespace-only rows
        blank = [None, "", "  \n\t "][int(rng.integers(3))]
        docs.insert(int(rng.integers(0, len(docs) + 1)), blank)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), tmp,
                   row_group_size=row_group_rows, compression="zstd")
    os.replace(tmp, path)
    return size


def build_corpus(work_dir: Path, n_shards: int, shard_mb: float = 25.0, seed: int = 0,
                 unique_frac: float = 0.15) -> Path:
    """work_dir/shards/shard_{k}.parquet for k < n_shards (reused when already built), and
    work_dir/corpus-{n}/ holding hard links to the first n: the glob for n shards."""
    shards = work_dir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    manifest_path = shards / "manifest.json"
    params = {"version": VERSION, "seed": seed, "shard_bytes": int(shard_mb * 1e6),
              "unique_frac": unique_frac}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("params") != params:
        manifest = {"params": params, "text_bytes": {}}
        for old in [*shards.glob("shard_*.parquet"), *work_dir.glob("corpus-*/shard_*.parquet")]:
            old.unlink()
    real: list[str] = []
    words = np.empty(0, dtype=object)
    for k in range(n_shards):
        path = shards / f"shard_{k}.parquet"
        if path.is_file() and str(k) in manifest["text_bytes"]:
            continue
        if not real:
            real = sample_texts()
            words = np.array(" ".join(real).split(), dtype=object)
        print(f"[corpus] writing {path.name}", flush=True)
        manifest["text_bytes"][str(k)] = write_shard(path, k, seed, params["shard_bytes"], real,
                                                     words, unique_frac)
        manifest_path.write_text(json.dumps(manifest, indent=1))
    out = work_dir / f"corpus-{n_shards}"
    out.mkdir(exist_ok=True)
    for k in range(n_shards):
        link = out / f"shard_{k}.parquet"
        target = shards / f"shard_{k}.parquet"
        if not (link.exists() and os.path.samefile(link, target)):
            link.unlink(missing_ok=True)
            os.link(target, link)
    return out


def corpus_text_bytes(work_dir: Path, n_shards: int) -> int:
    manifest = json.loads((work_dir / "shards" / "manifest.json").read_text())
    return sum(manifest["text_bytes"][str(k)] for k in range(n_shards))
