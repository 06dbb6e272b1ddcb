"""Data: parquet shards -> tokens (cached once) -> packed blocks -> a resumable shard iterator.

    discovery.py   globs -> shards in natural numeric order, the plan logged
    shards.py      opening and validating parquet shards, reading documents
    tokenizer.py   loading a local tokenizer, the trained fallback, the encoders
    cache.py       `argonne-ds prepare`: tokenize each shard once into uint32 files + index
    stream.py      packing into blocks and the resumable, rank-aware iterator
"""


class DataError(Exception):
    """A problem with the user's data or tokenizer, phrased for the user: names the file and what
    to do. The CLI prints it as one line."""
