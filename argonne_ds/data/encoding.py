"""A shard's rows through an encoder, batch by batch: the one tokenization path of `prepare`
(in this process, or in encode_worker.py's helper processes) and of streaming mode.

Below cache.py, encode_worker.py and stream.py, which all read through it; it imports neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from argonne_ds.data.discovery import Shard
from argonne_ds.data.shards import TextBatch, iter_text_batches
from argonne_ds.data.tokenizer import Encoder

TOKEN_DTYPE = np.uint32  # Qwen's 151k vocab does not fit uint16


def _read_ahead(batches: Iterator[TextBatch]) -> Iterator[TextBatch]:
    """The same batches, the next one read (and decompressed) on a thread while the caller
    encodes this one: pyarrow and gigatoken both release the GIL. Errors surface in order."""
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = pool.submit(next, batches, None)
            yield batch


def iter_encoded(shard: Shard, text_column: str, encoder: Encoder, start_row: int = 0,
                 read_ahead: bool = False, batch_rows: int | None = None,
                 stop_row: int | None = None,
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]:
    """(tokens, per-doc lengths, per-doc row numbers, rows read, skipped docs) batch by batch,
    rows [start_row, stop_row): the one tokenization path of prepare and streaming mode."""
    batches = iter_text_batches(shard, text_column, start_row=start_row, batch_rows=batch_rows,
                                stop_row=stop_row)
    for batch in _read_ahead(batches) if read_ahead else batches:
        if len(batch.texts):
            tokens, lengths = encoder.encode(batch.texts)
        else:
            tokens, lengths = np.empty(0, TOKEN_DTYPE), np.empty(0, np.int64)
        yield tokens, lengths, batch.rows.to_numpy(), batch.n_rows, batch.n_skipped
