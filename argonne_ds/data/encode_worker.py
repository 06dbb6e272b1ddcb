"""prepare's tokenizer processes: gigatoken on every core, in memory that does not grow with the
data.

gigatoken 0.10.0 keeps pretoken caches that grow with every new pretoken (upstream issue #36;
`set_max_cache_bytes` came after 0.10.0), so one process tokenizing a large corpus grows without
bound. Here shards are tokenized by worker processes that each live for a bounded amount of work
and are then replaced:

    prepare --shard--> server  `python -m argonne_ds.data.encode_server tokenizer.json`
            <-done---    |     imports and loads the tokenizer once, never encodes; cuts each
                         |     shard into row ranges of about equal text, two per core; appends
                         |     the ranges' token files in order
                         | fork (~5 ms; copy-on-write shares the loaded tokenizer)
                         v
                       workers, one per core, each taking the next range: after WORKER_MTOK
                       million tokens (or MAX_GROWTH_MB more RSS) a worker stops between two
                       batches, says where, and exits; a fresh fork goes on from there

Why processes, not gigatoken's threads: separate processes on separate ranges encode ~25% faster
here (2 cores) than one process with 2 threads. Why fork from a server: a new worker costs
milliseconds, not a new interpreter and tokenizer load (~0.7 s), so replacing workers often
(which is what bounds the memory) costs only their cold caches: ~8% at 4x here. Forking is safe
because the server never encodes, so gigatoken's thread pool does not exist there. `prestart`
launches the server before the caller loads its own HF tokenizer: the start-ups overlap.

Protocol, one JSON object per line, parent and server: request {shard, column, sep, out};
replies: {"rows": n} progress lines, then one of {"done": counts}, {"error": message} (a
DataError: a bad shard; the first by row, as reading in order would have found) or {"fatal":
traceback}. The parent fsyncs and renames `out` (cache._tokenize_shard).

This module imports encoding.py (the workers' `iter_encoded`) and tokenizer.py (the server's
`GigatokenEncoder`), which never import it back (tests/test_imports.py): hence the parent's
entry point is `tokenize_shard` here, called by cache.py, not a method of the encoder.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard

if TYPE_CHECKING:  # imported where used: the parent imports this module early (`prestart`)
    from argonne_ds.data.tokenizer import GigatokenEncoder

# A worker is replaced after this many million tokens (env ARGONNE_ENCODE_WORKER_MTOK), or
# once its RSS has grown this much over its size after its first batch (MiB, env
# ARGONNE_ENCODE_MAX_GROWTH_MB; a guard for unusual text): what its caches may hold. 16 M
# tokens ~ 45 MB of text; measured here, workers then peak at ~260 MB RSS whatever the corpus
# size, against ~420 MB (and growing) at 4x without a limit.
WORKER_MTOK, MAX_GROWTH_MB = 16, 192
# A shard is cut into up to RANGES_PER_WORKER ranges per worker, of at least MIN_PART_MB of text
# each (env ARGONNE_ENCODE_MIN_PART_MB), handed out to whichever worker is free.
RANGES_PER_WORKER, MIN_PART_MB = 2, 4
IDLE_WORKERS_S = 10.0  # workers (and their caches) go when no shard came for this long
IDLE_SERVER_S = 120.0  # then the server; the parent starts another when needed


def n_workers() -> int:
    env = os.environ.get("ARGONNE_ENCODE_WORKERS") or os.environ.get("RAYON_NUM_THREADS")
    return max(1, int(env) if env else len(os.sched_getaffinity(0)))


def env_number(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


class ServerExited(RuntimeError):
    """The server process is gone. `unstarted`: it exited cleanly (idle timeout) without taking
    the request, which can then be sent to a new server."""

    def __init__(self, message: str, unstarted: bool) -> None:
        super().__init__(message)
        self.unstarted = unstarted


# ---- the parent's side ------------------------------------------------------------------------


class EncodeServer:
    """A running server process and the pipe to it (one request at a time)."""

    def __init__(self, json_path: str) -> None:
        self.json_path = json_path
        self.owner = os.getpid()
        # Its stderr is kept for error messages, not shown: prepare's output stays one line.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives with proc
        env = os.environ | {"OPENBLAS_NUM_THREADS": "1"}  # numpy's BLAS threads: unused
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "argonne_ds.data.encode_server", json_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env,
            close_fds=True)
        self._ready: bool | None = None
        self.error = ""
        self.worker_requests = 0  # ranges sent to workers, continuations after a recycle too

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def ready(self) -> bool:
        """Wait until the tokenizer is loaded: False (see .error) if gigatoken cannot take it."""
        if self._ready is None:
            msg = self._read()
            self._ready, self.error = bool(msg.get("ready")), msg.get("error", "")
        return self._ready

    def tokenize(self, shard: Shard, text_column: str, sep: int, out: str,
                 on_rows: Callable[[int], None] | None = None, batch_rows: int | None = None,
                 ) -> tuple[int, int, int]:
        """Tokenize the whole shard into `out` (created or truncated): (tokens, docs, skipped
        docs). Raises DataError for a bad shard."""
        self._send({"path": shard.path, "size": shard.size, "mtime_ns": shard.mtime_ns,
                    "column": text_column, "sep": sep, "out": out, "batch_rows": batch_rows})
        msg = self._read(first_reply=True)
        while "rows" in msg:
            if on_rows is not None:
                on_rows(msg["rows"])
            msg = self._read()
        if "error" in msg:
            raise DataError(msg["error"])
        if "fatal" in msg:
            raise RuntimeError(f"the tokenizer process failed on {shard.path}:\n{msg['fatal']}")
        self.worker_requests += msg["requests"]
        return msg["n_tokens"], msg["n_docs"], msg["n_skipped"]

    def _send(self, obj: dict) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._died(first_reply=True)

    def _read(self, first_reply: bool = False) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self._died(first_reply)
        return json.loads(line)

    def _died(self, first_reply: bool) -> None:
        code = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-4000:].decode(errors="replace").strip()
        raise ServerExited(f"the tokenizer process for {self.json_path} exited (code {code})"
                           + (f":\n{tail}" if tail else ""), first_reply and code == 0)

    def close(self, wait: bool = True) -> None:
        if self.owner != os.getpid():
            return
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # EOF: the workers and the server exit
        if not wait:
            return
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_SERVERS: dict[tuple[str, int, int], EncodeServer] = {}


def _key(json_path: str) -> tuple[str, int, int]:
    st = os.stat(json_path)
    return os.path.realpath(json_path), st.st_size, st.st_mtime_ns


def get_server(json_path: str) -> EncodeServer:
    """This process's server for the tokenizer file, started if there is none (or it exited)."""
    key = _key(json_path)
    server = _SERVERS.get(key)
    if server is None or not server.alive():
        server = _SERVERS[key] = EncodeServer(json_path)
    return server


def prestart(tokenizer_dir: str | os.PathLike[str] | None) -> None:
    """Start the server for this tokenizer folder now, so that its start-up (imports, loading
    the tokenizer: ~0.7 s) runs beside the caller's. Best effort: never raises."""
    try:
        import gigatoken  # noqa: F401 - only to know it is installed

        path = os.path.join(os.fspath(tokenizer_dir or ""), "tokenizer.json")
        if tokenizer_dir and os.path.isfile(path):
            get_server(path)
    except Exception:  # noqa: BLE001 - the real load reports problems
        pass


def tokenize_shard(encoder: GigatokenEncoder, shard: Shard, text_column: str, out: str,
                   on_rows: Callable[[int], None] | None = None,
                   batch_rows: int | None = None) -> tuple[int, int, int] | None:
    """Tokenize a whole shard into the file `out` with the encoder's tokenizer in the helper
    processes (bounded memory): (tokens, docs, skipped docs); None when gigatoken cannot take
    this tokenizer (the encoder then falls back in its `encode`, or has raised DataError).
    Raises DataError for a bad shard."""
    for attempt in range(2):
        if encoder.failed:
            return None
        server = get_server(encoder.json_path)
        if not server.ready():
            encoder.unusable(server.error)
            continue
        try:
            return server.tokenize(shard, text_column, encoder.sep, out, on_rows, batch_rows)
        except ServerExited as e:
            if attempt or not e.unstarted:  # it left on idle just as we asked: once more
                raise
    return None


def close_servers(wait: bool = True) -> None:
    for server in _SERVERS.values():
        server.close(wait)
    _SERVERS.clear()


# At exit, no waiting: on EOF the workers and the server exit by themselves, at once.
atexit.register(close_servers, wait=False)
