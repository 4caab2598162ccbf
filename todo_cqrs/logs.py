"""One JSON line per request or event on stdout, as Knative and any log pipeline expect.

The event loop never writes to stdout itself: a line is appended to a buffer, and every 50 ms the
buffer goes, as one chunk, to a writer thread that may block on a slow pipe without stalling requests.
Outside an event loop (command-line tools, start-up) a line is written at once. Each process makes its
writer on its first line (a gunicorn worker is forked from the master that imported the function: no
thread or lock of the master's is usable in it), and writes out what is left when it exits.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import queue
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any

import orjson

from todo_cqrs.settings import settings

FLUSH_EVERY_S = 0.05  # LOG_FLUSH_SECONDS (the unit tests write only when they flush)
MAX_QUEUED_CHUNKS = 2000  # about 100 s of logs at one chunk per flush; beyond it lines are dropped

_fields: ContextVar[dict[str, Any] | None] = ContextVar("log_fields", default=None)


def start_record(**fields: Any) -> dict[str, Any]:
    """Begin the log record of one request; handlers add to it with `annotate`."""
    record = {"function": settings().function_name, **fields}
    _fields.set(record)
    return record


def annotate(**fields: Any) -> None:
    """Add fields (todo_id, event_id, ...) to the current request's log line."""
    record = _fields.get()
    if record is not None:
        record.update(fields)


def current_record() -> dict[str, Any] | None:
    return _fields.get()


def _line(record: dict[str, Any]) -> bytes:
    line = {"ts": round(time.time(), 3), **record}
    try:
        return orjson.dumps(line, default=str) + b"\n"
    except TypeError:  # a lone surrogate quoted from a hostile request: ASCII escapes instead
        return json.dumps(line, default=str, separators=(",", ":")).encode() + b"\n"


def write(record: dict[str, Any]) -> None:
    _process_writer().write(_line(record))


def log_event(message: str, **fields: Any) -> None:
    """A line that belongs to no request (the publisher, start-up, a background failure)."""
    write({"function": settings().function_name, "message": message, **fields})


class _Writer:
    def __init__(self, fd: int) -> None:
        self.pid = os.getpid()
        self._fd = fd
        self._buffer: list[bytes] = []
        self._flush_pending = False
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0

    def write(self, line: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_now(line)
            return
        self._buffer.append(line)
        if not self._flush_pending:
            self._flush_pending = True
            loop.call_later(float(os.environ.get("LOG_FLUSH_SECONDS", FLUSH_EVERY_S)), self.flush)

    def flush(self) -> None:
        """Hand what is buffered to the writer thread."""
        self._flush_pending = False
        if not self._buffer:
            return
        chunk = b"".join(self._buffer)
        self._buffer.clear()
        if self._chunks.qsize() >= MAX_QUEUED_CHUNKS:
            self.dropped += chunk.count(b"\n")
            return
        self._ensure_thread()
        self._chunks.put(chunk)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._write_now(chunk)

    def _write_now(self, data: bytes) -> None:
        sys.stdout.flush()  # print()ed text first, so lines keep their order
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except InterruptedError:
                continue
            except OSError:
                return  # stdout closed: nothing to tell anyone

    def close(self) -> None:
        """At exit: write what is buffered and queued (by this process: a forked child's copy of its
        parent's writer is not its own)."""
        if self.pid != os.getpid():
            return
        self.flush()
        if self._thread is not None and self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join(2.0)
        else:
            while True:
                try:
                    chunk = self._chunks.get_nowait()
                except queue.Empty:
                    return
                if chunk is not None:
                    self._write_now(chunk)


_writer: _Writer | None = None


def _process_writer() -> _Writer:
    global _writer
    if _writer is None or _writer.pid != os.getpid():
        _writer = _Writer(1)
        atexit.register(_writer.close)
    return _writer


def flush() -> None:
    """Write out what is buffered (tests, shutdown)."""
    if _writer is not None:
        _writer.close()
