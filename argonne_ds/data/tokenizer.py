"""Tokenizers: a local HF tokenizer folder (never the network), the trained fallback, and the
encoders that turn a batch of texts into one uint32 stream with a separator after each document.

The prepare path uses only `tokenizers` (fast to import); `load_hf_tokenizer` gives the
transformers object (pad token ensured, model_max_length = block size) for training/generation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard, shard_list_fingerprint
from argonne_ds.fileio import temp_path

logger = logging.getLogger(__name__)

SEPARATOR = "<|endoftext|>"
FALLBACK_PAD = "<|pad|>"
_FINGERPRINT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt")


@dataclass
class LoadedTokenizer:
    path: str
    backend: Tokenizer
    separator_id: int
    separator: str
    vocab_size: int  # max id + 1: the smallest embedding that can hold every id
    fingerprint: str


def _token_name(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


_LOADED: dict[tuple[str, str], LoadedTokenizer] = {}
_ENCODERS: dict[tuple[str, str, str], Encoder] = {}


def load_tokenizer(path: str | Path, model_vocab_size: int | None = None) -> LoadedTokenizer:
    """A tokenizer folder holding tokenizer.json (HF format); local files only. Memoised per
    process by path and file contents (loading Qwen's takes ~0.4 s)."""
    key = (os.path.realpath(path), tokenizer_fingerprint(path))
    if key not in _LOADED:
        _LOADED[key] = _load_tokenizer(Path(path))
    tok = _LOADED[key]
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise DataError(
            f"{tok.path}: the tokenizer has {tok.vocab_size:,} token ids but the model's "
            f"vocab_size is {model_vocab_size:,}; use a model config with vocab_size >= "
            f"{tok.vocab_size}")
    return tok


def _load_tokenizer(folder: Path) -> LoadedTokenizer:
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise DataError(f"--tokenizer-path {folder}: no tokenizer.json there; point it at a "
                        "local Hugging Face tokenizer folder (e.g. Qwen2.5-3B-Instruct)")
    try:
        backend = Tokenizer.from_file(str(tj))
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception subclasses
        raise DataError(f"{tj}: not a readable tokenizer.json ({e})") from e
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text())
    separator = SEPARATOR if backend.token_to_id(SEPARATOR) is not None else _token_name(
        config.get("eos_token"))
    sep_id = backend.token_to_id(separator) if separator else None
    if sep_id is None:
        raise DataError(f"{folder}: the tokenizer has neither {SEPARATOR} nor an eos_token to "
                        "separate documents; add one to tokenizer_config.json")
    vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    return LoadedTokenizer(str(folder), backend, sep_id, separator, vocab_size,
                           tokenizer_fingerprint(folder))


def load_hf_tokenizer(path: str | Path, block_size: int) -> Any:
    """The transformers tokenizer, offline, with a pad token and model_max_length = block size."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        # Reuse an existing token: adding one would grow the vocab past the embedding.
        tok.pad_token = SEPARATOR if tok.convert_tokens_to_ids(SEPARATOR) is not None else (
            tok.eos_token)
    tok.model_max_length = block_size
    return tok


# ---- fallback: a byte-level BPE trained on the data --------------------------------------------


def _sample_texts(shards: Sequence[Shard], text_column: str, budget: int) -> Iterator[str]:
    from argonne_ds.data.shards import iter_text_batches

    seen = 0
    for shard in shards:
        for batch in iter_text_batches(shard, text_column):
            for text in batch.texts.to_pylist():
                yield text
                seen += len(text)
                if seen >= budget:
                    return


def sampled_shards(shards: Sequence[Shard], budget: int) -> list[Shard]:
    """The leading shards whose bytes cover the sample; appending shards keeps the key stable."""
    out, total = [], 0
    for s in shards:
        out.append(s)
        total += s.size
        if total >= budget:
            break
    return out


def fallback_tokenizer_dir(
    shards: Sequence[Shard], text_column: str, cache_dir: str | Path,
    vocab_size: int = 32_000, sample_bytes: int = 64 * 2**20,
) -> Path:
    """Where the fallback tokenizer for this data and vocabulary lives. It appears there whole
    (trained under a temporary name, then renamed), so a folder holding `tokenizer.json` is
    complete and can be read without the build lock."""
    key = hashlib.sha256(json.dumps(
        [shard_list_fingerprint(sampled_shards(shards, sample_bytes)), vocab_size, sample_bytes,
         text_column]).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"tokenizer-bpe{vocab_size}-{key}"


def train_fallback_tokenizer(
    shards: Sequence[Shard], text_column: str, cache_dir: str | Path,
    vocab_size: int = 32_000, sample_bytes: int = 64 * 2**20,
) -> Path:
    """Train (or reuse) a byte-level BPE on the first `sample_bytes` of text, in shard order.
    Deterministic for the same data; saved under cache_dir and reused on the next run."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    sample = sampled_shards(shards, sample_bytes)
    out = fallback_tokenizer_dir(shards, text_column, cache_dir, vocab_size, sample_bytes)
    if (out / "tokenizer.json").is_file():
        logger.info("fallback tokenizer: reusing %s", out)
        return out
    logger.info("fallback tokenizer: training byte-level BPE (vocab %d) on %s", vocab_size,
                ", ".join(s.name for s in sample))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SEPARATOR, FALLBACK_PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_sample_texts(sample, text_column, sample_bytes), trainer=trainer)
    tmp = temp_path(out)
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SEPARATOR,
        "pad_token": FALLBACK_PAD, "bos_token": None, "unk_token": None,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False}, indent=2))
    try:
        os.replace(tmp, out)  # atomic: a reader sees a whole tokenizer or none
    except OSError:  # another process finished first
        logger.info("fallback tokenizer: %s appeared meanwhile; using it", out)
    return out


# ---- encoders ---------------------------------------------------------------------------------


class Encoder(Protocol):
    name: str

    def encode(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (tokens uint32: each document followed by the separator, per-document
        lengths int64 including the separator)."""
        ...


def _join_with_separator(flat: np.ndarray, offsets: np.ndarray, sep: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Documents flat[offsets[i]:offsets[i+1]] -> each followed by `sep`, and their lengths
    (separator included). One vectorised insert: no per-document Python work."""
    offsets = np.asarray(offsets, dtype=np.int64)
    flat = np.asarray(flat, dtype=np.uint32)[offsets[0]:offsets[-1]]
    out = np.insert(flat, offsets[1:] - offsets[0], np.uint32(sep))
    return out, np.diff(offsets) + 1


class HFEncoder:
    """HF `tokenizers` batch encoding (Rust, multi-threaded)."""

    name = "tokenizers"

    def __init__(self, tok: LoadedTokenizer) -> None:
        self.backend, self.sep = tok.backend, tok.separator_id

    def encode(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        encs = self.backend.encode_batch_fast(texts.to_pylist(), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.uint32,
                           count=int(lengths.sum()))
        return _join_with_separator(flat, np.concatenate([[0], np.cumsum(lengths)]), self.sep)


def _awkward_strings(texts: pa.Array) -> Any:
    """An arrow string array as an awkward array over the same buffers (no copy). gigatoken
    0.10 only takes int64 offsets without an option type (int32 offsets, which a batch without
    nulls has, raise "awkward input must be an array of strings"): hence large_string, whose
    cast rewrites only the offsets."""
    import awkward as ak
    import pyarrow.compute as pc

    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if texts.null_count:  # not from iter_text_batches; keep one (empty) document per row
        texts = pc.fill_null(texts, "")
    if not pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.large_string())
    _, offsets, data = texts.buffers()
    offs = np.frombuffer(offsets, dtype=np.int64, count=len(texts) + 1, offset=8 * texts.offset)
    chars = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return ak.Array(ak.contents.ListOffsetArray(
        ak.index.Index64(offs), ak.contents.NumpyArray(chars, parameters={"__array__": "char"}),
        parameters={"__array__": "string"}))


class GigatokenEncoder:
    """gigatoken (Rust): the same ids as `tokenizers`, 10-20x faster; reads arrow's buffers
    without making Python objects.

    The backend loads on the first `encode` (~0.4 s): `prepare` tokenizes in helper processes
    (encode_worker.tokenize_shard, which builds this class there) and never loads it here.
    gigatoken 0.10.0's pretoken caches grow with every new pretoken (upstream #36): the helpers
    bound that by replacing their workers; in this process (streaming mode) the backend is
    rebuilt after `reload_bytes` of text.
    """

    name = "gigatoken"

    def __init__(self, tok: LoadedTokenizer | None = None, *, json_path: str | Path | None = None,
                 sep: int | None = None, fallback: Encoder | None = None,
                 parallel: bool | None = None, reload_bytes: int = 2**30) -> None:
        import gigatoken  # cheap (the Rust module); raises here when not installed

        if tok is not None:
            json_path, sep = Path(tok.path) / "tokenizer.json", tok.separator_id
        if json_path is None or sep is None:
            raise TypeError("GigatokenEncoder needs a LoadedTokenizer or json_path and sep")
        self.json_path, self.sep = str(json_path), sep
        self.fallback = fallback  # auto mode: used when gigatoken cannot take the tokenizer
        self.parallel = parallel  # None: gigatoken decides (serial in forked/multiprocessing)
        self.reload_bytes, self._since_load = reload_bytes, 0
        self._gt: Any = None
        self._failed = ""
        # Later gigatoken versions can cap the caches themselves (before construction).
        if hasattr(gigatoken, "set_max_cache_bytes"):
            gigatoken.set_max_cache_bytes(256 * 2**20)

    @property
    def failed(self) -> str:
        """Why gigatoken cannot take this tokenizer (then `encode` falls back); "" if it can or
        has not been tried."""
        return self._failed

    def load(self) -> Any:
        """The gigatoken tokenizer, loaded now if not yet; None when it cannot take this
        tokenizer and there is a fallback."""
        if self._gt is None and not self._failed:
            try:
                self._gt = self.build()
            except Exception as e:  # noqa: BLE001 - it raises bare Exceptions on unknown models
                self.unusable(" ".join(f"{type(e).__name__}: {e}".split()))
        return self._gt

    def build(self) -> Any:
        """A fresh gigatoken tokenizer (raises whatever gigatoken raises)."""
        import gigatoken

        return gigatoken.Tokenizer.from_json(Path(self.json_path).read_bytes())

    def unusable(self, why: str) -> None:
        """gigatoken cannot take this tokenizer: fall back (auto) or say so (--encoder
        gigatoken)."""
        if self.fallback is None:
            raise DataError(f"gigatoken cannot take tokenizer {self.json_path} ({why}); pass "
                            "--encoder tokenizers")
        logger.info("gigatoken cannot take %s (%s); using %s", self.json_path, why,
                    self.fallback.name)
        self._failed = why

    def encode(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        gt = self.load()
        if gt is None:
            assert self.fallback is not None
            return self.fallback.encode(texts)
        out = gt.encode_batch(_awkward_strings(texts), parallel=self.parallel)
        self._since_load += texts.nbytes
        if self._since_load > self.reload_bytes:  # a fresh backend: fresh (empty) caches
            self._gt, self._since_load = None, 0
        layout = out.layout
        if hasattr(layout, "offsets") and hasattr(layout.content, "data"):
            # One flat buffer of ids plus document offsets: read both in place.
            flat, offsets = np.asarray(layout.content.data), np.asarray(layout.offsets)
        else:  # another layout (not seen from 0.10.0): let awkward flatten it
            import awkward as ak

            flat = np.asarray(ak.flatten(out, axis=1), dtype=np.uint32)
            offsets = np.concatenate([[0], np.cumsum(np.asarray(ak.num(out, axis=1)))])
        return _join_with_separator(flat, offsets, self.sep)


def make_encoder(tok: LoadedTokenizer, prefer: str = "auto") -> Encoder:
    """The fastest exact encoder that takes this tokenizer: gigatoken, else HF tokenizers.
    Memoised per process (gigatoken's conversion of Qwen's tokenizer takes ~0.4 s, on first
    use)."""
    key = (tok.path, tok.fingerprint, prefer)
    if key not in _ENCODERS:
        _ENCODERS[key] = _make_encoder(tok, prefer)
    return _ENCODERS[key]


def _make_encoder(tok: LoadedTokenizer, prefer: str) -> Encoder:
    if prefer == "tokenizers":
        return HFEncoder(tok)
    try:
        # Lazy: whether gigatoken takes this tokenizer shows on first use, which falls back to
        # HF tokenizers in auto mode.
        return GigatokenEncoder(tok, fallback=HFEncoder(tok) if prefer == "auto" else None)
    except ImportError as e:
        if prefer == "gigatoken":
            raise DataError(f"--encoder gigatoken: gigatoken is not installed ({e}); pip "
                            "install gigatoken or pass --encoder tokenizers") from e
        logger.info("gigatoken unavailable (%s); using HF tokenizers", e)
    return HFEncoder(tok)
