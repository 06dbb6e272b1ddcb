"""prepare's tokenizer process: gigatoken with memory that does not grow with the data.

gigatoken 0.10.0 keeps a pretoken cache per encode thread that grows with every new pretoken
(upstream issue #36; `set_max_cache_bytes` came after 0.10.0), so one process tokenizing a
large corpus grows without bound. Here shards are tokenized in a child process that exits once
its resident memory has grown by a set amount, between two batches, and is replaced at once:

    prepare --requests--> server  `python -m argonne_ds.data.encode_worker tokenizer.json`
            <--replies--    |     imports and loads the tokenizer once; never encodes
                            | fork (~5 ms; copy-on-write shares the loaded tokenizer)
                            v
                          child   serves requests until its RSS has grown past the cap,
                                  replies and exits; the server forks the next child

Forking from a server that has loaded the tokenizer but never encoded makes a replacement cost
milliseconds instead of a new interpreter and tokenizer load (~0.7 s), and is safe: no thread
(rayon's pool included) exists in the server when it forks. `prestart` launches the server
before the parent loads its own HF tokenizer, so the two start-ups overlap on two cores.

Protocol, one JSON object per line. Request: tokenize the rows from `start_row` of a shard,
writing (or appending) the tokens to `out`. Replies: {"rows": n} progress lines, then one of
{"done": true, counts, "next_row"} (next_row is null when the shard is finished, else the child
stopped at its cap and the parent sends the rest), {"error": message} (a DataError: a bad shard)
or {"fatal": traceback}. The parent fsyncs and renames the file (cache._tokenize_shard).
"""

from __future__ import annotations

import array
import atexit
import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
import tempfile
import termios
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard

# A child exits once its RSS has grown this much since it was forked (MiB; environment
# ARGONNE_ENCODE_MAX_GROWTH_MB). The default scales with the encode threads, whose pretoken
# caches grow side by side; a batch's buffers (~100 MB) count in it. Recycling costs only cold
# caches: measured here, +5% CPU when a child lives for 100 MB of text.
GROWTH_MB_PER_THREAD = 128
CHILD_IDLE_S = 10.0  # a child idle this long exits, freeing its caches
SERVER_IDLE_S = 120.0  # a server idle this long exits; the parent starts another when needed
EXIT_RECYCLE, EXIT_IDLE, EXIT_EOF = 10, 11, 12


class ServerExited(RuntimeError):
    """The server process is gone. `unstarted`: it exited cleanly (idle timeout) without taking
    the request, which can then be sent to a new server."""

    def __init__(self, message: str, unstarted: bool) -> None:
        super().__init__(message)
        self.unstarted = unstarted


def max_growth_bytes() -> int:
    threads = int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count() or 1)
    mb = os.environ.get("ARGONNE_ENCODE_MAX_GROWTH_MB") or GROWTH_MB_PER_THREAD * max(2, threads)
    return int(float(mb) * 2**20)


# ---- the parent's side ------------------------------------------------------------------------


class EncodeServer:
    """A running server process and the pipe to it (one request at a time)."""

    def __init__(self, json_path: str) -> None:
        self.json_path = json_path
        self.owner = os.getpid()
        # Its stderr is kept for error messages, not shown: prepare's output stays one line.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives with proc
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "argonne_ds.data.encode_worker", json_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env,
            close_fds=True)
        self._ready: bool | None = None
        self.error = ""
        self.requests = 0

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
        req = {"path": shard.path, "size": shard.size, "mtime_ns": shard.mtime_ns,
               "column": text_column, "sep": sep, "out": out, "start_row": 0, "append": False,
               "batch_rows": batch_rows}
        totals = [0, 0, 0]
        while True:
            self._send(req)
            self.requests += 1
            msg = self._read(first_reply=True)
            while "rows" in msg:
                if on_rows is not None:
                    on_rows(msg["rows"])
                msg = self._read()
            if "error" in msg:
                raise DataError(msg["error"])
            if "fatal" in msg:
                raise RuntimeError(f"the tokenizer process failed on {shard.path}:\n"
                                   f"{msg['fatal']}")
            for i, k in enumerate(("n_tokens", "n_docs", "n_skipped")):
                totals[i] += msg[k]
            if msg["next_row"] is None:
                return totals[0], totals[1], totals[2]
            req |= {"start_row": msg["next_row"], "append": True}  # a fresh child goes on

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
                self.proc.stdin.close()  # EOF: the child and the server exit
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


def _close_all(wait: bool = True) -> None:
    for server in _SERVERS.values():
        server.close(wait)
    _SERVERS.clear()


# At exit, no waiting: the servers see EOF and leave by themselves.
atexit.register(_close_all, wait=False)


# ---- the server and its children --------------------------------------------------------------


class _Pipe:
    """Lines over raw file descriptors: nothing is buffered across a fork or an exit."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.rfd], [], [], timeout)[0])

    def at_eof(self) -> bool:
        """Readable with nothing to read: the parent closed the pipe (or exited)."""
        waiting = array.array("i", [0])
        fcntl.ioctl(self.rfd, termios.FIONREAD, waiting)
        return waiting[0] == 0

    def readline(self) -> bytes:
        """One request. The parent sends the next only after our reply, so a read never takes
        part of another line (which would be lost when this child exits)."""
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                return b""
            buf += chunk
        return buf

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode() + b"\n"
        while data:
            data = data[os.write(self.wfd, data):]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tokenize(encoder: Any, req: dict, pipe: _Pipe, cap: int) -> dict:
    """One request; stops between two batches once the RSS passes `cap`."""
    from argonne_ds.data.cache import iter_encoded

    encoder.sep = req["sep"]
    shard = Shard(req["path"], req["size"], req["mtime_ns"])
    row, n_tokens, n_docs, n_skipped = req["start_row"], 0, 0, 0
    next_row = None
    with open(req["out"], "ab" if req["append"] else "wb") as f:
        for tokens, lengths, _, n_rows, skipped in iter_encoded(
                shard, req["column"], encoder, start_row=row, read_ahead=True,
                batch_rows=req.get("batch_rows")):
            tokens.tofile(f)
            n_tokens, n_docs, n_skipped = n_tokens + len(tokens), n_docs + len(lengths), (
                n_skipped + skipped)
            row += n_rows
            pipe.send({"rows": row})
            if _rss() > cap:  # a fresh child goes on from here
                next_row = row
                break
    return {"done": True, "n_tokens": n_tokens, "n_docs": n_docs, "n_skipped": n_skipped,
            "next_row": next_row}


def _child(encoder: Any, pipe: _Pipe, growth: int) -> int:
    cap = _rss() + growth  # at the fork: the server's pages, shared
    while True:
        if not pipe.readable(CHILD_IDLE_S):
            return EXIT_IDLE
        line = pipe.readline()
        if not line:
            return EXIT_EOF
        try:
            reply = _tokenize(encoder, json.loads(line), pipe, cap)
        except DataError as e:
            reply = {"error": str(e)}
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises
            reply = {"fatal": traceback.format_exc()}
        pipe.send(reply)
        if "fatal" in reply or _rss() > cap:
            return EXIT_RECYCLE


def serve(json_path: str) -> int:
    # The protocol gets private copies of stdin/stdout; a stray print goes to stderr.
    pipe = _Pipe(os.dup(0), os.dup(1))
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    try:
        import awkward  # noqa: F401 - imported once here, not in every child

        import argonne_ds.data.cache  # noqa: F401
        from argonne_ds.data.tokenizer import GigatokenEncoder

        # parallel=True: gigatoken would go serial in a forked child; our children own the cores.
        encoder = GigatokenEncoder(json_path=json_path, sep=0, parallel=True)
        encoder.load()  # no fallback: raises DataError when gigatoken cannot take it
    except Exception as e:  # noqa: BLE001 - sent to the parent, which falls back or says so
        pipe.send({"ready": False, "error": str(e)})
        return 0
    pipe.send({"ready": True})
    growth = max_growth_bytes()
    while True:
        if not pipe.readable(SERVER_IDLE_S) or pipe.at_eof():
            return 0
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(encoder, pipe, growth)
            finally:
                os._exit(code)
        started = time.monotonic()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == EXIT_EOF:
            return 0
        if code not in (EXIT_RECYCLE, EXIT_IDLE):
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            pipe.send({"fatal": f"the tokenizer child process died ({how}) after "
                                f"{time.monotonic() - started:.1f} s; out of memory? see dmesg"})
            return 1


if __name__ == "__main__":
    # os._exit: nothing to flush, and tearing the loaded tokenizer down costs ~0.3 s.
    os._exit(serve(sys.argv[1]))
