"""In-memory fakes of the read side's adapters, so get_todos, project_event and dead_letter run with no
service: the read store, the cache and its version notices, the dead-letter store.

A test passes them in (`load_main("get_todos").build(fake_queries(...))`); nothing is patched. Each fake
has the behaviour of the adapter it stands for, and tests/contract runs the same cases against both,
so what a unit test proves through a fake holds for the real thing.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import boto3
from moto import mock_aws

from todo_cqrs.adapters.cache import CachedTodo, CacheUnavailable
from todo_cqrs.dead_letter.store import DeadLetter
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.domain.events import Change
from todo_cqrs.domain.todo import Status, Todo
from todo_cqrs.projection.handlers import Projection
from todo_cqrs.query.handlers import Cursors, Queries, ReadSlots, Waiters
from todo_cqrs.settings import settings


@dataclass
class FakeReadStore:
    """A fake read database (todo_cqrs.adapters.read_store.ReadStore), in memory: projected todos and
    tombstones by id. Each call is one statement on a connection of its own, as in the real store.

    `arrive_after(n, change)` lets a projection land after n statements, for the polling min_version
    wait; `unreachable` makes every call raise DependencyUnavailable; `fail_with` makes every
    statement raise that exception (a DataError, a connection lost mid-statement...).
    """

    rows: dict[int, tuple[Todo | None, int]] = field(default_factory=dict)
    unreachable: bool = False
    fail_with: BaseException | None = None
    reads: int = 0
    row_lookups: list[int] = field(default_factory=list)
    list_queries: list[tuple[Status | None, int, int]] = field(default_factory=list)
    applied: list[tuple[Change, datetime]] = field(default_factory=list)
    _arrivals: list[tuple[int, Callable[[], None]]] = field(default_factory=list)

    def put(self, todo: Todo) -> Todo:
        self.rows[todo.id] = (todo, todo.version)
        return todo

    def tombstone(self, todo_id: int, version: int) -> None:
        self.rows[todo_id] = (None, version)

    def version_of(self, todo_id: int) -> int | None:
        return self.rows[todo_id][1] if todo_id in self.rows else None

    def arrive_after(self, reads: int, change: Callable[[], None]) -> None:
        self._arrivals.append((reads, change))

    def _connect(self) -> None:
        if self.unreachable:
            raise DependencyUnavailable(
                "the read database is unreachable", cause=ConnectionRefusedError("fake read DB is down")
            )
        for due, change in [a for a in self._arrivals if a[0] <= self.reads]:
            change()
            self._arrivals.remove((due, change))
        self.reads += 1
        if self.fail_with is not None:
            raise self.fail_with

    async def get(self, todo_id: int) -> tuple[Todo | None, int | None]:
        self._connect()
        self.row_lookups.append(todo_id)
        return self.rows.get(todo_id, (None, None))

    async def page(self, status: Status | None, after_id: int, limit: int) -> list[Todo]:
        self._connect()
        self.list_queries.append((status, after_id, limit))
        live = sorted((t for t, _ in self.rows.values() if t is not None), key=lambda t: t.id)
        return [t for t in live if t.id > after_id and (status is None or t.status == status)][:limit]

    async def apply(self, change: Change, event_time: datetime) -> bool:
        self._connect()
        return self._apply(change, event_time)

    async def apply_all(self, changes: list[tuple[Change, datetime]]) -> list[bool]:
        """Many changes in one statement, each as `apply` applies it, in list order."""
        self._connect()
        return [self._apply(change, moment) for change, moment in changes]

    def _apply(self, change: Change, event_time: datetime) -> bool:
        """The upsert gated by version: only a newer version moves the row; a deletion is a tombstone."""
        held = self.version_of(change.todo_id)
        if held is not None and held >= change.version:
            return False
        self.rows[change.todo_id] = (change.todo, change.version)
        self.applied.append((change, event_time))
        return True


@dataclass
class FakeVersionWatch:
    """A fake of the subscription to the projection's notices (VersionWatch), in memory, no Redis.

    `healthy` False stands for a subscription that is down (readers then poll the read model).
    `land_when_waited(todo_id, projection)` runs `projection` (which lands a version in the fake read
    store and invalidates the fake cache, whose notice resolves the waiter) once a reader waits for
    that todo, on the event loop, after the reader's current step.
    """

    healthy: bool = True
    waiting: dict[int, list[tuple[int, asyncio.Future[str]]]] = field(default_factory=dict)
    waits: list[tuple[int, int]] = field(default_factory=list)
    _landings: dict[int, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    def land_when_waited(self, todo_id: int, projection: Callable[[], Awaitable[None]]) -> None:
        self._landings[todo_id] = projection

    async def ready(self) -> bool:
        return self.healthy

    def wait_for(self, todo_id: int, version: int) -> asyncio.Future[str]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self.waiting.setdefault(todo_id, []).append((version, future))
        self.waits.append((todo_id, version))
        landing = self._landings.pop(todo_id, None)
        if landing is not None:
            loop.create_task(landing())
        return future

    def forget(self, todo_id: int, future: asyncio.Future[str]) -> None:
        waiting = self.waiting.get(todo_id, [])
        waiting[:] = [(v, f) for v, f in waiting if f is not future]
        if not waiting:
            self.waiting.pop(todo_id, None)

    def notice(self, todo_id: int, version: int, traceparent: str) -> None:
        for wanted, future in self.waiting.get(todo_id, []):
            if wanted <= version and not future.done():
                future.set_result(traceparent)


@dataclass
class FakeCache:
    """A fake Redis cache (todo_cqrs.adapters.cache.TodoCache), in memory: todos by id, list pages by
    (generation, page), and the projection's invalidations (a floor version per todo that no store may
    go below, a list generation bump, a notice to the watch).

    `unreachable` stands for a Redis that does not answer: reads raise CacheUnavailable (the reader must
    bypass), stores are dropped, an invalidation raises DependencyUnavailable (the projection: 503).
    """

    todos: dict[int, CachedTodo] = field(default_factory=dict)
    pages: dict[tuple[bytes, str], bytes] = field(default_factory=dict)
    generation: int = 0
    stored_todos: list[tuple[int, int]] = field(default_factory=list)
    stored_pages: list[str] = field(default_factory=list)
    invalidations: list[tuple[int, int, str | None]] = field(default_factory=list)
    floors: dict[int, int] = field(default_factory=dict)
    watch: FakeVersionWatch | None = None
    unreachable: bool = False

    def _read(self) -> None:
        if self.unreachable:
            raise CacheUnavailable("fake redis is down")

    async def get_todo(self, todo_id: int) -> CachedTodo | None:
        self._read()
        return self.todos.get(todo_id)

    async def store_todo(self, todo_id: int, version: int, body: bytes) -> None:
        if self.unreachable:
            return
        self.stored_todos.append((todo_id, version))
        current = self.todos.get(todo_id)
        if (current is None or current.version < version) and self.floors.get(todo_id, 0) <= version:
            self.todos[todo_id] = CachedTodo(version, body)

    async def get_list(self, page: str) -> tuple[bytes, bytes | None]:
        self._read()
        generation = str(self.generation).encode()
        return generation, self.pages.get((generation, page))

    async def store_list(self, generation: bytes, page: str, body: bytes) -> None:
        if self.unreachable:
            return
        self.stored_pages.append(page)
        self.pages[(generation, page)] = body

    async def invalidate_many(self, changes: list[tuple[int, int, str | None]]) -> None:
        for change in changes:
            await self.invalidate(*change)

    async def invalidate(self, todo_id: int, version: int, traceparent: str | None = None) -> None:
        if self.unreachable:
            raise DependencyUnavailable(
                "redis is unreachable", cause=ConnectionRefusedError("fake redis is down")
            )
        self.invalidations.append((todo_id, version, traceparent))
        # The floor: what was invalidated, or what was cached if newer (the real script's marker).
        cached = self.todos.pop(todo_id, None)
        self.floors[todo_id] = max(self.floors.get(todo_id, 0), version, cached.version if cached else 0)
        self.generation += 1
        if self.watch is not None:
            self.watch.notice(todo_id, version, traceparent or "")


@dataclass
class UnreachableCache(FakeCache):
    """A fake cache whose Redis does not answer (see FakeCache.unreachable)."""

    unreachable: bool = True


# Not UTF-8, with NUL and high bytes: only a lossless store gives these back.
BINARY_DATA = b"\x00\xff\xfe binary \x80 payload"


def a_dead_letter(
    event_id: str = "partition:0/offset:7", data: bytes | None = BINARY_DATA, **kw: Any
) -> DeadLetter:
    """A letter as the KafkaSource dead-letters an event: its attributes and the error extensions."""
    attributes = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/apis/v1/namespaces/todo/kafkasources/todo-events#todo-events",
        "type": "todo.updated.v1",
        "subject": "7",
        "time": "2026-11-27T09:59:59.5Z",
        "datacontenttype": "application/octet-stream",
        "partitionkey": "7",
        "knativeerrordest": "http://project-event.todo.svc.cluster.local",
        "knativeerrorcode": "400",
        "knativeerrordata": base64.b64encode(b'{"error":{"code":"invalid_event"}}').decode(),
    }
    return DeadLetter(attributes, data, **kw)


@contextmanager
def moto_s3(bucket: str) -> Iterator[None]:
    """moto's mock_aws: an in-memory fake of S3 holding `bucket`, with fake credentials so nothing
    reaches AWS (the environment is restored afterwards)."""
    fake_credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in fake_credentials}
    os.environ.update(fake_credentials)
    try:
        with mock_aws():
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class FakeDeadLetterStore:
    """A fake dead-letter store (todo_cqrs.dead_letter.store), in memory, no S3, no directory."""

    letters: dict[str, DeadLetter] = field(default_factory=dict)
    unreachable: bool = False

    def put(self, letter: DeadLetter) -> str:
        if self.unreachable:
            raise DependencyUnavailable("the dead-letter store is unreachable")
        key = letter.new_key()
        self.letters[key] = letter
        return key

    def list(self) -> list[str]:
        return sorted(self.letters)

    def get(self, key: str) -> DeadLetter:
        return self.letters[key]

    def delete(self, key: str) -> None:
        self.letters.pop(key, None)


# --- the dependencies of each read-side function, on fakes --------------------------------------------


def fake_queries(
    store: FakeReadStore | None = None,
    cache: FakeCache | None = None,
    watch: FakeVersionWatch | None = None,
    *,
    read_slots: int = 16,
    max_waiters: int = 64,
    min_version_wait_s: float = 2.0,
) -> Queries:
    """get_todos' dependencies on fakes, with the defaults of the settings (bounds as arguments)."""
    watch = watch or FakeVersionWatch()
    if cache is None:
        cache = FakeCache(watch=watch)
    return Queries(
        store=store or FakeReadStore(),
        cache=cache,
        watch=watch,
        slots=ReadSlots(read_slots),
        waiters=Waiters(max_waiters),
        cursors=Cursors(settings().cursor_key),
        min_version_wait_s=min_version_wait_s,
    )


def fake_projection(store: FakeReadStore | None = None, cache: FakeCache | None = None) -> Projection:
    """project_event's dependencies on fakes."""
    return Projection(store=store or FakeReadStore(), cache=cache or FakeCache())
