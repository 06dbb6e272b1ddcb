"""Opening, validating and reading parquet shards: every problem becomes one `DataError` naming the
file and what to do."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard

BAD_SHARD_HINT = "fix or remove the file, or pass --on-bad-shard skip"


def no_good_shards_error(n_shards: int, first_error: str | Exception) -> DataError:
    """--on-bad-shard skip with every shard bad: nothing is left to train on. Names the first
    problem, without the hint to skip (which is what got here)."""
    first = str(first_error).removesuffix(f"; {BAD_SHARD_HINT}")
    return DataError(f"every one of the {n_shards} shards is bad, so skipping them leaves no "
                     f"data; the first: {first}")


@dataclass
class TextBatch:
    """Rows [first_row, first_row + n_rows) of a shard: the kept documents and their row numbers.
    Null, empty and whitespace-only texts are dropped here and counted in `n_skipped`."""

    first_row: int
    n_rows: int
    texts: pa.Array  # string, no nulls, none blank
    rows: pa.Array  # int64 row number of each kept text
    n_skipped: int


def open_shard(shard: Shard, text_column: str) -> pq.ParquetFile:
    """Open and validate: readable parquet, has the text column, string-typed, at least one row."""
    try:
        pf = pq.ParquetFile(shard.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{shard.path}: not a readable parquet file ({e}); {BAD_SHARD_HINT}") from e
    schema = pf.schema_arrow
    if text_column not in schema.names:
        raise DataError(
            f"{shard.path}: no column {text_column!r} (columns: {', '.join(schema.names)}); "
            "pass --text-column NAME")
    kind = schema.field(text_column).type
    # Type null: every text is null (pandas writes an all-None column so); skipped and counted.
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind) or pa.types.is_null(kind)):
        raise DataError(
            f"{shard.path}: column {text_column!r} has type {kind}, not text; pass --text-column "
            "naming a string column")
    if pf.metadata.num_rows == 0:
        raise DataError(f"{shard.path}: has no rows (an empty or failed export?); "
                        f"{BAD_SHARD_HINT}")
    return pf


def _keep_mask(texts: pa.Array) -> pa.Array:
    """Not null, not empty, not only whitespace. `utf8_is_space` (all characters whitespace)
    stops at the first other character, unlike trimming, which copies every text; both use
    the same (Unicode) whitespace."""
    blank = pc.or_kleene(pc.equal(pc.binary_length(texts), 0), pc.utf8_is_space(texts))
    return pc.fill_null(pc.invert(blank), False)


# A batch holds about this much text (1 MiB per core, at least 4): enough for gigatoken to keep
# every core busy, little enough for bounded memory (streaming keeps one batch's tokens). On 2
# cores 2-16 MiB run at the same speed; past 4 MiB the buffers only add RSS.
BATCH_TEXT_BYTES = max(4, os.cpu_count() or 1) * 2**20


def _group_text_bytes(meta: pq.FileMetaData, text_column: str) -> list[int]:
    """Uncompressed bytes of the text column in each row group, from the footer."""
    sizes = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        sizes.append(next((group.column(j).total_uncompressed_size
                           for j in range(group.num_columns)
                           if group.column(j).path_in_schema == text_column),
                          group.total_byte_size))
    return sizes


def _rows_per_batch(meta: pq.FileMetaData, text_column: str) -> int:
    """Rows that hold about BATCH_TEXT_BYTES of text."""
    size = sum(_group_text_bytes(meta, text_column))
    return int(np.clip(BATCH_TEXT_BYTES * meta.num_rows // max(size, 1), 64, 2**17))


def split_rows(shard: Shard, text_column: str, parts: int, min_bytes: int
               ) -> list[tuple[int, int]]:
    """At most `parts` consecutive row ranges [start, stop) covering the shard, with about the
    same text each (from the footer; at least `min_bytes` each), cut at row-group boundaries
    where the groups allow it."""
    meta = open_shard(shard, text_column).metadata
    sizes = _group_text_bytes(meta, text_column)
    parts = int(max(1, min(parts, sum(sizes) // max(min_bytes, 1))))
    # The rows at which each part's share of the bytes is reached, row groups taken as uniform.
    cuts, row, seen = [0], 0, 0
    for i, size in enumerate(sizes):
        rows = meta.row_group(i).num_rows
        while len(cuts) < parts and seen + size >= sum(sizes) * len(cuts) / parts:
            frac = (sum(sizes) * len(cuts) / parts - seen) / max(size, 1)
            cut = row + (round(frac) * rows if meta.num_row_groups >= parts else int(frac * rows))
            if cut <= cuts[-1]:
                break
            cuts.append(cut)
        row, seen = row + rows, seen + size
    cuts.append(meta.num_rows)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def verify_pages(shard: Shard, text_column: str) -> None:
    """Read (decompress, decode) every page of the text column and discard it: raises the
    DataError that reading the shard in order would raise, before anything is used."""
    for _ in iter_text_batches(shard, text_column):
        pass


def iter_text_batches(
    shard: Shard, text_column: str, start_row: int = 0, batch_rows: int | None = None,
    pf: pq.ParquetFile | None = None, stop_row: int | None = None,
) -> Iterator[TextBatch]:
    """Documents of rows [start_row, stop_row) (default: to the end), in row order, a bounded
    batch at a time (`batch_rows`, by default the rows of about BATCH_TEXT_BYTES of text)."""
    pf = pf or open_shard(shard, text_column)
    meta = pf.metadata
    stop_row = meta.num_rows if stop_row is None else min(stop_row, meta.num_rows)
    # Skip whole row groups outside the rows without reading them (O(1) seek per row group).
    first_group, group_start = 0, 0
    while first_group < meta.num_row_groups:
        n = meta.row_group(first_group).num_rows
        if group_start + n > start_row:
            break
        group_start += n
        first_group += 1
    end_group, end_start = first_group, group_start
    while end_group < meta.num_row_groups and end_start < stop_row:
        end_start += meta.row_group(end_group).num_rows
        end_group += 1
    row = group_start
    try:
        batches = pf.iter_batches(batch_size=batch_rows or _rows_per_batch(meta, text_column),
                                  columns=[text_column],
                                  row_groups=range(first_group, end_group))
        for batch in batches:
            if row >= stop_row:
                break
            texts = batch.column(0)
            n_rows = len(texts)
            if row + n_rows <= start_row:
                row += n_rows
                continue
            if row < start_row:
                texts = texts.slice(start_row - row)
                row, n_rows = start_row, len(texts)
            if row + n_rows > stop_row:
                texts = texts.slice(0, stop_row - row)
                n_rows = len(texts)
            if isinstance(texts, pa.ChunkedArray):
                texts = texts.combine_chunks()
            if not pa.types.is_string(texts.type):
                texts = texts.cast(pa.large_string())
            keep = _keep_mask(texts)
            rows = pa.array(np.arange(row, row + n_rows, dtype=np.int64))
            if pc.all(keep).as_py() is False:  # else keep every text, without a copy
                texts, rows = pc.filter(texts, keep), pc.filter(rows, keep)
            yield TextBatch(row, n_rows, texts, rows, n_rows - len(texts))
            row += n_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{shard.path}: unreadable at row {row} ({e}); {BAD_SHARD_HINT}") from e
