"""The query side: todos from Redis, falling back to the read DB; plain dicts and JSON bytes out.

Every handler takes the query side's dependencies (`Queries`, built by todo_cqrs/bootstrap.py, or fakes
in the unit tests) and the request's values, already read; it returns a `Read` or raises a domain error,
wrapped in `ReadRefused` when the web layer must say how the cache was consulted (X-Cache).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from prometheus_client import Counter, Histogram

from todo_cqrs import metrics, tracing
from todo_cqrs.adapters.cache import CachedTodo, CacheUnavailable
from todo_cqrs.domain.errors import (
    NotFound,
    NotYetConsistent,
    Overloaded,
    TodoError,
    TooManyWaiters,
    ValidationFailed,
)
from todo_cqrs.domain.numbers import MAX_VERSION, ascii_positive_int
from todo_cqrs.domain.todo import Status, Todo
from todo_cqrs.logs import annotate

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
# Only while Redis (and so the projection's notices) is unreachable: poll the read model.
_POLL_FIRST_S, _POLL_MAX_S = 0.01, 0.1
# next_cursor's HMAC-SHA256 tag, truncated: forging one takes 2^128 tries.
_CURSOR_TAG_BYTES = 16
cache_reads = Counter("todo_cache_reads", "get_todos reads by cache outcome", ["kind", "result"])
min_version_wait = Histogram(
    "todo_min_version_wait_seconds",
    "How long a ?min_version read waited for the projection",
    ["outcome"],
    buckets=metrics.LATENCY_BUCKETS,
)
_CACHE_READS = {
    (kind, result): metrics.child(cache_reads, kind, result)
    for kind in ("item", "list")
    for result in ("hit", "miss", "bypass")
}


# --- what the handlers need (the adapters' shapes; tests/contract holds the fakes to them) ---------


class ReadModel(Protocol):
    """The read model as the queries use it (todo_cqrs.adapters.read_store.ReadStore)."""

    async def get(self, todo_id: int) -> tuple[Todo | None, int | None]: ...

    async def page(self, status: Status | None, after_id: int, limit: int) -> list[Todo]: ...


class Cache(Protocol):
    """The todo and page cache (todo_cqrs.adapters.cache.TodoCache); reads raise CacheUnavailable."""

    async def get_todo(self, todo_id: int) -> CachedTodo | None: ...

    async def store_todo(self, todo_id: int, version: int, body: bytes) -> None: ...

    async def get_list(self, page: str) -> tuple[bytes, bytes | None]: ...

    async def store_list(self, generation: bytes, page: str, body: bytes) -> None: ...


class Watch(Protocol):
    """The projection's version notices (todo_cqrs.adapters.cache.VersionWatch)."""

    @property
    def healthy(self) -> bool: ...

    async def ready(self) -> bool: ...

    def wait_for(self, todo_id: int, version: int) -> asyncio.Future[str]: ...

    def forget(self, todo_id: int, future: asyncio.Future[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class Read:
    """A query's answer: the JSON body, the todo's version (None for lists), and how the cache answered."""

    body: bytes
    version: int | None
    cache: str  # hit | miss | bypass


class ReadRefused(Exception):
    """A query's domain error, and how the cache was consulted before it (hit, miss or bypass)."""

    def __init__(self, error: TodoError, cache: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.cache = cache


def _positive_int(value: str, field: str, maximum: int) -> int:
    number = ascii_positive_int(value, maximum)
    if number is None:
        raise ValidationFailed(
            f"{field} must be an integer from 1 to {maximum}",
            [{"field": field, "message": f"must be an integer from 1 to {maximum} in ASCII digits"}],
        )
    return number


def parse_min_version(text: str | None) -> int | None:
    """?min_version: absent, or a version (ValidationFailed otherwise)."""
    return None if text is None else _positive_int(text, "min_version", MAX_VERSION)


class ReadSlots:
    """The read-DB queries of this process: as many at once as its pool holds (DB_POOL_SIZE and as
    many overflow), and as many again waiting; past that a read is refused at once (Overloaded),
    instead of queueing behind slow misses while the requests that the cache answers wait for a slot."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._busy = asyncio.Semaphore(capacity)
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self, state: str) -> AsyncIterator[None]:
        if self._busy.locked() and self._waiting >= self._capacity:
            raise ReadRefused(Overloaded("the read database is busy; retry shortly"), state)
        self._waiting += 1
        try:
            await self._busy.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._busy.release()


class Waiters:
    """The ?min_version reads of this process that the cache could not answer. Past
    MIN_VERSION_MAX_WAITERS, a new one is refused at once (TooManyWaiters: no read of the read DB, no
    wait): a flood of reads for versions that never come cannot take every connection and request slot
    for seconds."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.active = 0

    @contextlib.contextmanager
    def slot(self, state: str) -> Iterator[None]:
        if self.active >= self.capacity:
            min_version_wait.labels("refused").observe(0.0)
            message = "too many reads wait for a version in this process; retry shortly"
            raise ReadRefused(TooManyWaiters(message), state)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class Cursors:
    """next_cursor: `<payload>.<tag>`, both base64url. The payload says where the next page starts, the
    tag (an HMAC with CURSOR_SECRET's key) that this API gave it out."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_CURSOR_TAG_BYTES]

    def encode(self, last_id: int) -> str:
        payload = f"after:{last_id}".encode()
        return f"{_b64(payload)}.{_b64(self._tag(payload))}"

    def decode(self, cursor: str) -> int:
        """The id a cursor continues after; ValidationFailed for one this API did not give out (forged or
        altered), before it could reach the database or name a cache entry."""
        try:
            encoded, _, tag = cursor.partition(".")
            payload = _unb64(encoded)
            if hmac.compare_digest(_unb64(tag), self._tag(payload)):
                prefix, _, value = payload.decode().partition(":")
                after = ascii_positive_int(value)
                if prefix == "after" and after is not None:
                    return after
        except (binascii.Error, UnicodeDecodeError, ValueError):
            pass
        raise ValidationFailed(
            "cursor is not one this API gave out",
            [{"field": "cursor", "message": "use next_cursor from a previous page"}],
        )


@dataclass
class Queries:
    """What the query handlers use: the read model (behind this process's read slots), the cache, the
    projection's version notices, the bound of a ?min_version wait and the cursors' key."""

    store: ReadModel
    cache: Cache
    watch: Watch
    slots: ReadSlots
    waiters: Waiters
    cursors: Cursors
    min_version_wait_s: float

    async def aclose(self) -> None:
        """Close what the adapters made in this event loop (the engine, the Redis clients)."""
        for adapter in (self.watch, self.cache, self.store):
            closer = getattr(adapter, "aclose", None)
            if closer is not None:
                await closer()


async def _from_read_model(q: Queries, todo_id: int, state: str = "miss") -> tuple[Todo | None, int | None]:
    async with q.slots.slot(state):
        return await q.store.get(todo_id)


async def get_todo(q: Queries, todo_id: int, min_version: int | None = None) -> Read:
    """One todo. With min_version, wait (bounded) until the read model holds that version or later."""
    cache = q.cache
    state = "miss"
    try:
        cached = await cache.get_todo(todo_id)
    except CacheUnavailable:
        state, cached = "bypass", None
    if cached is not None and (min_version is None or cached.version >= min_version):
        _CACHE_READS["item", "hit"].inc()
        return Read(cached.body, cached.version, "hit")
    _CACHE_READS["item", state].inc()
    annotate(todo_id=todo_id)
    if min_version is None:
        todo, version = await _from_read_model(q, todo_id, state)
    else:
        with q.waiters.slot(state):
            todo, version = await _wait_for_version(q, todo_id, min_version, state)
    if todo is None:
        gone = "was deleted" if version is not None else "does not exist"
        raise ReadRefused(NotFound(f"todo {todo_id} {gone}"), state)
    body = orjson.dumps(todo.to_dict())
    if state == "miss":
        await cache.store_todo(todo_id, todo.version, body)
    return Read(body, todo.version, state)


async def _wait_for_version(
    q: Queries, todo_id: int, min_version: int, state: str
) -> tuple[Todo | None, int]:
    """Read-your-writes: the read model's row once it holds min_version or later. Woken by the
    projection's notice through Redis; polling the read DB only while Redis is unreachable."""
    started = time.monotonic()
    deadline = started + q.min_version_wait_s
    watch = q.watch
    pause = _POLL_FIRST_S
    woken_by = ""
    await watch.ready()
    while True:
        notified = watch.wait_for(todo_id, min_version) if watch.healthy else None
        try:
            todo, version = await _from_read_model(q, todo_id)
            if version is not None and version >= min_version:
                min_version_wait.labels("ready").observe(time.monotonic() - started)
                if woken_by:
                    annotate(woken_by_trace=woken_by)
                return todo, version
            left = deadline - time.monotonic()
            if left <= 0:
                min_version_wait.labels("timeout").observe(time.monotonic() - started)
                message = f"the read model does not hold version {min_version} of todo {todo_id} yet"
                raise ReadRefused(NotYetConsistent(f"{message}; retry shortly"), state)
            if notified is not None:
                attributes = {"todo.id": todo_id, "todo.version": min_version}
                # On a timeout: one last look at the read model, above.
                with tracing.span("wait for version", **attributes), contextlib.suppress(TimeoutError):
                    woken_by = await asyncio.wait_for(asyncio.shield(notified), left)
            else:
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, _POLL_MAX_S)
        finally:
            if notified is not None:
                watch.forget(todo_id, notified)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def page_params(args: Mapping[str, str], cursors: Cursors) -> tuple[Status | None, int, int]:
    """(status, limit, after_id) of a list query's parameters; ValidationFailed for one that is not valid."""
    status = None
    if "status" in args:
        if args["status"] not in Status.__members__:
            raise ValidationFailed(
                "status is not valid", [{"field": "status", "message": f"must be one of {', '.join(Status)}"}]
            )
        status = Status(args["status"])
    limit = _positive_int(args["limit"], "limit", MAX_LIMIT) if "limit" in args else DEFAULT_LIMIT
    after_id = cursors.decode(args["cursor"]) if "cursor" in args else 0  # `cursor=` too: 422
    return status, limit, after_id


async def list_todos(q: Queries, status: Status | None, limit: int, after_id: int) -> Read:
    """A page of live todos in ascending id, by key (no OFFSET): {"items": [...], "next_cursor": ...}."""
    page = f"{status or '*'}:{after_id}:{limit}"
    cache = q.cache
    state, generation = "miss", b""
    try:
        generation, cached = await cache.get_list(page)
        if cached is not None:
            _CACHE_READS["list", "hit"].inc()
            return Read(bytes(cached), None, "hit")
    except CacheUnavailable:
        state = "bypass"
    _CACHE_READS["list", state].inc()
    async with q.slots.slot(state):
        todos = await q.store.page(status, after_id, limit + 1)
    more = len(todos) > limit
    todos = todos[:limit]
    body: Any = {
        "items": [t.to_dict() for t in todos],
        "next_cursor": q.cursors.encode(todos[-1].id) if more else None,
    }
    encoded = orjson.dumps(body)
    if state == "miss":
        await cache.store_list(generation, page, encoded)
    return Read(encoded, None, state)
