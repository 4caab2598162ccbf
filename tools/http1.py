"""A small asyncio HTTP/1.1 client with keep-alive connection pools (httptools parses the answers).

Local tooling only: the local KafkaSource posts events with it, the pipeline page scrapes metrics and the
bench sends its open-loop load with it.
One request at a time per connection; a pool per origin keeps idle connections for less than the
functions' keep-alive (gunicorn's 2 s), so a reused connection is never one the server is closing.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import httptools

IDLE_KEEP_S = 1.5
MAX_IDLE = 64
MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class UpstreamError(Exception):
    """No answer: the connection failed, closed early, or the answer could not be read."""


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._future: asyncio.Future[Answer] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._answer: Answer | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._head = False
        self._keep_alive = True

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamError(f"connection closed{': ' + str(exc) if exc else ''}"))

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self._close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"unreadable answer: {exc}"))
            self._close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._answer is not None
        self._answer.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._answer is not None
        self._answer.status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        if self._head:  # a HEAD answer announces a length but has no body; httptools cannot know
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            self._fail(UpstreamError("answer too large"))
            self._close()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        future, answer = self._future, self._answer
        self._parser, self._future, self._answer = None, None, None
        if answer is not None:
            answer.body = b"".join(self._body)
        self._body = []
        if not self._keep_alive:
            self._close()
        if future is not None and not future.done() and answer is not None:
            future.set_result(answer)

    # use
    def send(self, request: bytes, head: bool) -> asyncio.Future[Answer]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._future = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._answer = Answer(0)
        self._body, self._size, self._head, self._keep_alive = [], 0, head, True
        self.transport.write(request)
        return self._future

    def _fail(self, error: Exception) -> None:
        future = self._future
        self._future, self._parser = None, None
        if future is not None and not future.done():
            future.set_exception(error)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one origin (host, port)."""

    def __init__(self, host: str, port: int, connect_timeout_s: float = 2.0) -> None:
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self._idle: collections.deque[_Connection] = collections.deque()
        self.host_header = f"{host}:{port}".encode()

    async def _connection(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_KEEP_S:
                return conn, True
            conn._close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from exc
        return conn, False

    async def request(
        self, request: bytes, *, head: bool = False, timeout_s: float = 30.0, retry: bool = False
    ) -> Answer:
        """Send raw request bytes, await the answer. `retry`: the request is idempotent, so it is sent
        once more on a fresh connection when a reused one fails before answering."""
        while True:
            conn, reused = await self._connection()
            try:
                answer = await asyncio.wait_for(conn.send(request, head), timeout_s)
                break
            except UpstreamError:
                conn._close()
                if not (reused and retry):
                    raise
                # again: another idle connection may be as stale; a fresh one fails for real
            except BaseException:
                conn._close()  # a timeout or a cancellation: its answer may still come, on no one's request
                raise
        if not conn.closed:
            conn.idle_since = time.monotonic()
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
            else:
                conn._close()
        return answer

    def close(self) -> None:
        while self._idle:
            self._idle.pop()._close()


def encode_request(
    method: str, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes | None, host: bytes
) -> bytes:
    """An HTTP/1.1 request with a Content-Length (bodies are forwarded whole, never chunked)."""
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + host]
    lines += [name + b": " + value for name, value in headers]
    if body is not None:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")
