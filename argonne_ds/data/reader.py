"""Sequential tokens from parquet shards, tokenized on the fly, with exact restartable positions
(the streaming source of data/stream.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard
from argonne_ds.data.encoding import TOKEN_DTYPE, iter_encoded
from argonne_ds.data.shards import verify_pages
from argonne_ds.data.tokenizer import Encoder

logger = logging.getLogger(__name__)


@dataclass
class StreamPos:
    shard: int = 0
    row: int = 0
    offset: int = 0  # tokens of document `row` (separator included) already consumed


class TokenReader:
    """Sequential tokens from parquet, tokenized on the fly, with exact restartable positions."""

    def __init__(self, shards: Sequence[Shard], text_column: str, encoder: Encoder,
                 pos: StreamPos, skip_bad: bool = False) -> None:
        self.shards, self.col, self.encoder = shards, text_column, encoder
        self.skip_bad = skip_bad
        self.shard = pos.shard
        self._batches = self._open(pos.shard, pos.row)
        self.tokens = np.empty(0, TOKEN_DTYPE)
        self.doc_starts = np.zeros(1, np.int64)
        self.doc_rows = np.empty(0, np.int64)
        self.end_row = pos.row  # first row after the current batch
        self.p = 0
        self._next_batch()
        if pos.offset:
            if not len(self.doc_rows) or self.doc_rows[0] != pos.row:
                raise DataError(f"{shards[pos.shard].path}: cannot resume at row {pos.row}: that "
                                "row holds no document now; the shard changed since the checkpoint")
            self.p = pos.offset

    def _open(self, shard: int, row: int):
        if shard >= len(self.shards):
            return iter(())
        if self.skip_bad:
            # Damaged pages behind a valid footer surface only when read: read the whole column
            # first (~10% of tokenizing it), so that a bad shard is skipped whole, as the cache
            # does, instead of failing after its readable rows were trained on.
            try:
                verify_pages(self.shards[shard], self.col)
            except DataError as e:
                logger.warning("skipping bad shard (--on-bad-shard skip; found while "
                               "streaming): %s", e)
                return iter(())
        return iter_encoded(self.shards[shard], self.col, self.encoder, start_row=row)

    def _next_batch(self) -> bool:
        """Load the next batch that has tokens; False at the end of the data."""
        while True:
            try:
                tokens, lengths, rows, n_rows, _ = next(self._batches)
            except StopIteration:
                if self.shard >= len(self.shards) - 1:
                    self.shard = len(self.shards)
                    self.tokens, self.p = np.empty(0, TOKEN_DTYPE), 0
                    return False
                self.shard += 1
                self.end_row = 0
                self._batches = self._open(self.shard, 0)
                continue
            self.end_row = int(rows[0]) + n_rows if len(rows) else self.end_row + n_rows
            if len(tokens):
                self.tokens, self.p = tokens, 0
                self.doc_starts = np.concatenate([[0], np.cumsum(lengths)])
                self.doc_rows = rows
                return True

    def read(self, n: int) -> np.ndarray:
        """Up to n tokens; fewer only at the end of the data."""
        parts, need = [], n
        while need:
            if self.p >= len(self.tokens) and not self._next_batch():
                break
            take = min(need, len(self.tokens) - self.p)
            parts.append(self.tokens[self.p:self.p + take])
            self.p += take
            need -= take
        return np.concatenate(parts) if parts else np.empty(0, TOKEN_DTYPE)

    def position(self) -> StreamPos:
        if self.p < len(self.tokens):
            i = int(np.searchsorted(self.doc_starts, self.p, side="right")) - 1
            return StreamPos(self.shard, int(self.doc_rows[i]), int(self.p - self.doc_starts[i]))
        return StreamPos(self.shard, self.end_row, 0)
