"""The encode server and its workers, the processes behind encode_worker.py (whose docstring
tells the design and the protocol): started as `python -m argonne_ds.data.encode_server
tokenizer.json`, it loads the tokenizer once and forks workers that each encode row ranges for
a bounded amount of work."""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import sys
import termios
import time
import traceback
from typing import IO, Any

from argonne_ds.data import DataError
from argonne_ds.data.discovery import Shard
from argonne_ds.data.encode_worker import (
    IDLE_SERVER_S,
    IDLE_WORKERS_S,
    MAX_GROWTH_MB,
    MIN_PART_MB,
    RANGES_PER_WORKER,
    WORKER_MTOK,
    env_number,
    n_workers,
)

EXIT_RECYCLE, EXIT_EOF = 10, 11  # a worker's exit: its budget is spent / its input closed


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
        self.tokens = int(env_number("ARGONNE_ENCODE_WORKER_MTOK", WORKER_MTOK) * 1e6)
        self.growth = int(env_number("ARGONNE_ENCODE_MAX_GROWTH_MB", MAX_GROWTH_MB) * 2**20)
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
        self.min_part = int(env_number("ARGONNE_ENCODE_MIN_PART_MB", MIN_PART_MB) * 2**20)
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
