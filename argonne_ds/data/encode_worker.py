"""prepare's tokenizer processes: gigatoken on every core, in memory that does not grow with the
data.

gigatoken 0.10.0 keeps pretoken caches that grow with every new pretoken (upstream issue #36;
`set_max_cache_bytes` came after 0.10.0), so one process tokenizing a large corpus grows without
bound. Here shards are tokenized by worker processes that each live for a bounded amount of work
and are then replaced:

    prepare --shard--> server  `python -m argonne_ds.data.encode_worker tokenizer.json`
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

import array
import atexit
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
import traceback
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

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
EXIT_RECYCLE, EXIT_EOF = 10, 11


def n_workers() -> int:
    env = os.environ.get("ARGONNE_ENCODE_WORKERS") or os.environ.get("RAYON_NUM_THREADS")
    return max(1, int(env) if env else len(os.sched_getaffinity(0)))


def _env(name: str, default: float) -> float:
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
            [sys.executable, "-m", "argonne_ds.data.encode_worker", json_path],
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


# ---- lines over file descriptors --------------------------------------------------------------


class _Lines:
    """JSON lines over raw file descriptors: nothing buffered in Python survives a fork."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd, self.buf = rfd, wfd, b""

    def fill(self) -> bool:
        """Read what is there (one read); False at EOF."""
        chunk = os.read(self.rfd, 1 << 16)
        self.buf += chunk
        return bool(chunk)

    def pop(self) -> list[dict]:
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines]

    def get(self) -> dict | None:
        """The next message, waiting for it; None at EOF."""
        while b"\n" not in self.buf:
            if not self.fill():
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode() + b"\n"
        while data:
            data = data[os.write(self.wfd, data):]

    def readable(self, timeout: float) -> bool:
        return b"\n" in self.buf or bool(select.select([self.rfd], [], [], timeout)[0])

    def at_eof(self) -> bool:
        """Readable with nothing to read: the other end closed."""
        waiting = array.array("i", [0])
        fcntl.ioctl(self.rfd, termios.FIONREAD, waiting)
        return not self.buf and waiting[0] == 0


# ---- the workers ------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Budget:
    """A worker's life: WORKER_MTOK tokens, and an RSS cap of its size after its first batch
    (buffers and allocator pools, which any worker has) plus MAX_GROWTH_MB."""

    def __init__(self) -> None:
        self.tokens = int(_env("ARGONNE_ENCODE_WORKER_MTOK", WORKER_MTOK) * 1e6)
        self.growth = int(_env("ARGONNE_ENCODE_MAX_GROWTH_MB", MAX_GROWTH_MB) * 2**20)
        self.cap = 0

    def spent(self, tokens: int = 0) -> bool:
        self.tokens -= tokens
        rss = _rss()
        if not self.cap:
            self.cap = rss + self.growth
        return rss > self.cap or self.tokens < 0


def _tokenize_range(encoder: Any, req: dict, io: _Lines, budget: _Budget) -> dict:
    """Rows [start, stop) of a shard into req["out"]; stops between two batches once the
    memory budget is spent (next_row: where a new worker goes on)."""
    from argonne_ds.data.encoding import iter_encoded

    shard = Shard(req["path"], req["size"], req["mtime_ns"])
    row, n_tokens, n_docs, n_skipped, next_row = req["start"], 0, 0, 0, None
    with open(req["out"], "ab" if req["append"] else "wb") as f:
        for tokens, lengths, _, n_rows, skipped in iter_encoded(
                shard, req["column"], encoder, start_row=row, stop_row=req["stop"],
                read_ahead=True, batch_rows=req["batch_rows"]):
            tokens.tofile(f)
            n_tokens, n_docs, n_skipped = (n_tokens + len(tokens), n_docs + len(lengths),
                                           n_skipped + skipped)
            row += n_rows
            io.send({"row": row})
            if budget.spent(len(tokens)) and row < req["stop"]:
                next_row = row
                break
    return {"done": True, "n_tokens": n_tokens, "n_docs": n_docs, "n_skipped": n_skipped,
            "next_row": next_row}


def _worker_main(encoder: Any, io: _Lines) -> int:
    budget = _Budget()
    while (req := io.get()) is not None:
        encoder.sep, encoder.parallel = req["sep"], req["parallel"]
        try:
            reply = _tokenize_range(encoder, req, io, budget)
        except DataError as e:
            reply = {"error": str(e)}
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises
            reply = {"fatal": traceback.format_exc()}
        reply["exiting"] = "fatal" in reply or budget.spent()
        io.send(reply)
        if reply["exiting"]:
            return EXIT_RECYCLE
    return EXIT_EOF


class _Worker:
    """The server's handle on one forked worker: a socket pair to it."""

    def __init__(self, encoder: Any, not_theirs: list[int]) -> None:
        mine, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                mine.close()
                for fd in not_theirs:  # the server's pipes, the other workers' sockets
                    os.close(fd)
                code = _worker_main(encoder, _Lines(theirs.fileno(), theirs.fileno()))
            finally:
                os._exit(code)
        theirs.close()
        self.sock = mine
        self.io = _Lines(mine.fileno(), mine.fileno())

    def reap(self, kill: bool = False) -> int:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.sock.close()
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def _died(code: int) -> str:
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    return f"a tokenizer worker died ({how}); out of memory? (see dmesg)"


class _Server:
    def __init__(self, encoder: Any, parent: _Lines) -> None:
        self.encoder, self.parent = encoder, parent
        self.min_part = int(_env("ARGONNE_ENCODE_MIN_PART_MB", MIN_PART_MB) * 2**20)
        self.slots: list[_Worker | None] = [None] * n_workers()

    def worker(self, i: int) -> _Worker:
        w = self.slots[i]
        if w is None:
            others = [self.parent.rfd, self.parent.wfd] + [
                x.sock.fileno() for x in self.slots if x is not None]
            w = self.slots[i] = _Worker(self.encoder, others)
        return w

    def stop_workers(self, kill: bool = False) -> None:
        workers = [w for w in self.slots if w is not None]
        for w in workers:  # EOF to all first: they exit side by side
            w.sock.shutdown(socket.SHUT_RDWR)
        for w in workers:
            w.reap(kill)
        self.slots = [None] * len(self.slots)

    def run(self) -> int:
        while True:
            if not self.parent.readable(IDLE_WORKERS_S):
                self.stop_workers()
                if not self.parent.readable(IDLE_SERVER_S):
                    return 0
            if self.parent.at_eof() or (req := self.parent.get()) is None:
                self.stop_workers()
                return 0
            try:
                reply = self.shard(req)
            except Exception:  # noqa: BLE001 - a bug here: say so, start afresh
                reply = {"fatal": traceback.format_exc()}
                self.stop_workers(kill=True)
            self.parent.send(reply)

    def shard(self, req: dict) -> dict:
        from argonne_ds.data.shards import split_rows

        shard = Shard(req["path"], req["size"], req["mtime_ns"])
        try:
            ranges = split_rows(shard, req["column"], RANGES_PER_WORKER * len(self.slots),
                                self.min_part)
        except DataError as e:
            return {"error": str(e)}
        outs = [req["out"]] + [f"{req['out']}.part{i}" for i in range(1, len(ranges))]
        base = {k: req[k] for k in ("path", "size", "mtime_ns", "column", "sep", "batch_rows")}
        # One range: gigatoken's own threads share it.
        base["parallel"] = len(ranges) == 1 and len(self.slots) > 1
        parts = [{"i": i, "start": a, "stop": b, "out": out, "append": False, "first": a,
                  "row": a, "counts": [0, 0, 0], "error": None, "fatal": None}
                 for i, ((a, b), out) in enumerate(zip(ranges, outs))]
        todo = list(parts)  # handed out in row order to whichever worker is free
        busy: dict[int, dict] = {}  # slot -> its part
        requests, last_progress = 0, time.monotonic()

        def start(i: int, part: dict) -> None:
            nonlocal requests
            self.worker(i).io.send(base | {k: part[k] for k in ("start", "stop", "out",
                                                                "append")})
            busy[i], requests = part, requests + 1

        def drop_after(part: dict) -> None:
            """An error at this part: the later ones no longer matter."""
            todo[:] = [p for p in todo if p["i"] < part["i"]]
            for j in [j for j in busy if busy[j]["i"] > part["i"]]:
                self.slots[j].reap(kill=True)  # type: ignore[union-attr]
                self.slots[j] = None
                del busy[j]

        for i in range(min(len(self.slots), len(todo))):
            start(i, todo.pop(0))
        while busy:
            socks = {self.slots[i].sock.fileno(): i for i in busy}  # type: ignore[union-attr]
            ready = select.select([*socks, self.parent.rfd], [], [])[0]
            if self.parent.rfd in ready and self.parent.at_eof():  # the parent is gone
                self.stop_workers(kill=True)
                raise SystemExit(0)
            for fd in ready:
                if fd not in socks:
                    continue
                i = socks[fd]
                w, part = self.slots[i], busy.get(i)
                if w is None or part is None or w.sock.fileno() != fd:
                    continue  # stopped meanwhile by drop_after
                if not w.io.fill():  # the worker died mid-range
                    self.slots[i] = None
                    part["fatal"] = _died(w.reap())
                    del busy[i]
                    drop_after(part)
                    continue
                for msg in w.io.pop():
                    if "row" in msg:
                        part["row"] = msg["row"]
                        continue
                    del busy[i]
                    if "done" in msg:
                        part["counts"] = [c + msg[k] for c, k in zip(
                            part["counts"], ("n_tokens", "n_docs", "n_skipped"))]
                    part["error"], part["fatal"] = msg.get("error"), msg.get("fatal")
                    if msg["exiting"]:
                        w.reap()
                        self.slots[i] = None
                    if msg.get("next_row") is not None:  # recycled: a new worker goes on
                        part |= {"start": msg["next_row"], "append": True}
                        start(i, part)
                        break
                    if part["error"] or part["fatal"]:
                        drop_after(part)
                    if todo:
                        start(i, todo.pop(0))
                    break  # a final reply is a worker's last word on its request
            if time.monotonic() - last_progress > 0.5:
                self.parent.send({"rows": sum(p["row"] - p["first"] for p in parts)})
                last_progress = time.monotonic()
        return self.finish(parts, requests)

    @staticmethod
    def finish(parts: list[dict], requests: int) -> dict:
        """Append the ranges' files to the first, in order; or the first error, by row."""
        problems = [p for p in parts if p["fatal"] or p["error"]]
        if not problems:
            with open(parts[0]["out"], "ab") as dst:
                for p in parts[1:]:
                    with open(p["out"], "rb") as src:
                        _append(src, dst)
        for p in parts[1:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p["out"])
        fatal = [p["fatal"] for p in parts if p["fatal"]]
        if fatal:
            return {"fatal": fatal[0]}
        if problems:
            return {"error": problems[0]["error"]}
        totals = [sum(p["counts"][k] for p in parts) for k in range(3)]
        return {"done": True, "n_tokens": totals[0], "n_docs": totals[1],
                "n_skipped": totals[2], "requests": requests}


def _append(src: IO[bytes], dst: IO[bytes]) -> None:
    left = os.fstat(src.fileno()).st_size
    try:
        while left > 0:  # in the kernel, not through Python
            n = os.copy_file_range(src.fileno(), dst.fileno(), left)
            if n == 0:
                break
            left -= n
    except OSError:  # a filesystem without it: copy the rest
        pass
    if left > 0:
        src.seek(os.fstat(src.fileno()).st_size - left)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst)


def serve(json_path: str) -> int:
    # The protocol gets private copies of stdin/stdout; a stray print goes to stderr.
    parent = _Lines(os.dup(0), os.dup(1))
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        import awkward  # noqa: F401 - imported once here, not in every worker
        import pyarrow as pa

        with contextlib.suppress(NotImplementedError):  # a build without it: the default
            # jemalloc retains less freed memory than the default mimalloc (-20 MB a worker).
            pa.set_memory_pool(pa.jemalloc_memory_pool())

        import argonne_ds.data.encoding  # noqa: F401 - loaded once here, not in every worker
        from argonne_ds.data.tokenizer import GigatokenEncoder

        encoder = GigatokenEncoder(json_path=json_path, sep=0)
        encoder._gt = encoder.build()
    except Exception as e:  # noqa: BLE001 - sent to the parent, which falls back or says so
        parent.send({"ready": False, "error": " ".join(f"{type(e).__name__}: {e}".split())})
        return 0
    parent.send({"ready": True})
    return _Server(encoder, parent).run()


if __name__ == "__main__":
    # os._exit: nothing to flush, and tearing the loaded tokenizer down costs ~0.3 s.
    os._exit(serve(sys.argv[1]))
