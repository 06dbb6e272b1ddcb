"""Opening, validating and reading parquet shards: every problem becomes one `DataError` naming the
file and what to do."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard

BAD_SHARD_HINT = "fix or remove the file, or pass --on-bad-shard skip"


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
    trimmed = pc.utf8_trim_whitespace(texts)
    return pc.fill_null(pc.greater(pc.utf8_length(trimmed), 0), False)


def iter_text_batches(
    shard: Shard, text_column: str, start_row: int = 0, batch_rows: int = 8192,
    pf: pq.ParquetFile | None = None,
) -> Iterator[TextBatch]:
    """Documents from `start_row` on, in row order, a bounded batch at a time."""
    pf = pf or open_shard(shard, text_column)
    meta = pf.metadata
    # Skip whole row groups before start_row without reading them (O(1) seek per row group).
    first_group, group_start = 0, 0
    while first_group < meta.num_row_groups:
        n = meta.row_group(first_group).num_rows
        if group_start + n > start_row:
            break
        group_start += n
        first_group += 1
    row = group_start
    try:
        batches = pf.iter_batches(batch_size=batch_rows, columns=[text_column],
                                  row_groups=range(first_group, meta.num_row_groups))
        for batch in batches:
            texts = batch.column(0)
            n_rows = len(texts)
            if row + n_rows <= start_row:
                row += n_rows
                continue
            if row < start_row:
                texts = texts.slice(start_row - row)
                row, n_rows = start_row, len(texts)
            if isinstance(texts, pa.ChunkedArray):
                texts = texts.combine_chunks()
            if not pa.types.is_string(texts.type):
                texts = texts.cast(pa.large_string())
            keep = _keep_mask(texts)
            kept = pc.filter(texts, keep)
            rows = pc.filter(pa.array(range(row, row + n_rows), pa.int64()), keep)
            yield TextBatch(row, n_rows, kept, rows, n_rows - len(kept))
            row += n_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{shard.path}: unreadable at row {row} ({e}); {BAD_SHARD_HINT}") from e
