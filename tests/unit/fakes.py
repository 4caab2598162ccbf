"""In-memory fakes of the core's async I/O, so the functions run through functions-framework with no service.

Only the adapters are faked (the write store and its idempotency keys, the outbox publisher, the read
store, the cache and its version notices, the dead-letter store); the functions, the HTTP edge, the
handlers and the domain under test are always the real ones. Each fake is installed with monkeypatch
on the module attribute the handler looks up at call time, so it serves whichever event loop the test
client runs (the real adapters cache their connections per loop: todo_cqrs/loop_local.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import functions_framework.aio
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from todo_cqrs import dead_letter, logs
from todo_cqrs.adapters import write_store
from todo_cqrs.adapters.cache import CachedTodo, CacheUnavailable
from todo_cqrs.adapters.publisher import OutboxRecord
from todo_cqrs.command import handlers as command_handlers
from todo_cqrs.command import idempotency
from todo_cqrs.command.idempotency import IdempotencyKey, Reply
from todo_cqrs.dead_letter.store import DeadLetter
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.domain.events import Change, TodoEvent
from todo_cqrs.domain.todo import NewTodo, Status, Todo
from todo_cqrs.outbox import relay
from todo_cqrs.projection import handlers as projection_handlers
from todo_cqrs.query import handlers as query_handlers
from todo_cqrs.tracing import TraceContext

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"
HTTP_FUNCTIONS = ("create_todo", "update_todo", "delete_todo", "get_todos", "relay_outbox")
EVENT_SINKS = ("project_event", "dead_letter")
ALL_FUNCTIONS = HTTP_FUNCTIONS + EVENT_SINKS
T0 = datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)
_FRAMEWORK_ENV = ("FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE")


@contextmanager
def function_app(name: str) -> Iterator[Starlette]:
    """functions/<name>/main.py as the ASGI app functions-framework's own create_asgi_app makes of it.

    create_asgi_app executes the source file afresh on every call, registers it as sys.modules["main"],
    appends its folder to sys.path and sets FUNCTION_TARGET (and FUNCTION_SIGNATURE_TYPE): load it once
    per test module, and undo those process-wide traces afterwards so the next module starts clean.
    """
    saved_path, saved_main = list(sys.path), sys.modules.get("main")
    saved_env = {variable: os.environ.get(variable) for variable in _FRAMEWORK_ENV}
    try:
        yield functions_framework.aio.create_asgi_app(
            target=name, source=str(FUNCTIONS_DIR / name / "main.py")
        )
    finally:
        sys.path[:] = saved_path
        if saved_main is None:
            sys.modules.pop("main", None)
        else:
            sys.modules["main"] = saved_main
        for env_name, value in saved_env.items():
            if value is None:
                os.environ.pop(env_name, None)
            else:
                os.environ[env_name] = value


@contextmanager
def function_client(name: str) -> Iterator[TestClient]:
    """A test client of functions/<name>/main.py (see `function_app`); it runs the app on one event
    loop, in a thread of its own, while its context is open."""
    with function_app(name) as app, TestClient(app) as client:
        yield client


ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def load_main(name: str) -> ModuleType:
    """functions/<name>/main.py as a module of its own (not sys.modules["main"]), for its `build`."""
    spec = importlib.util.spec_from_file_location(f"{name}_main", FUNCTIONS_DIR / name / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def client_of(function: Callable[[Request], Awaitable[Response]]) -> Iterator[TestClient]:
    """A test client of a function built with fakes (`load_main(name).build(fakes)`), routed as
    functions-framework routes it: every path, every method, to the one function."""

    async def endpoint(request: Request) -> Response:
        return await function(request)

    with TestClient(Starlette(routes=[Route("/{path:path}", endpoint, methods=ALL_METHODS)])) as client:
        yield client


def a_todo(todo_id: int = 1, **fields: Any) -> Todo:
    values: dict[str, Any] = {
        "title": f"todo {todo_id}",
        "description": "",
        "status": Status.CREATED,
        "version": 1,
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(fields)
    return Todo(id=todo_id, **values)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """Check the contract's error body {"error": {"code", "message", "details"}}; return the error."""
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert_error_body(response)
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def assert_error_body(response: Any) -> None:
    """Whatever the code: the body is JSON, exactly {"error": {"code": snake_case, "message": text,
    "details": [...]}}, as application/json."""
    content_type = response.headers.get("content-type", "")
    assert content_type.split(";")[0].strip() == "application/json", (response.status_code, content_type)
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"].replace("_", "").isalpha(), error
    assert error["code"] == error["code"].lower(), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], list), error


def log_lines(capfd: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The JSON log lines written to fd 1 so far (the writer batches them: flush it first)."""
    logs.flush()
    return [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]


# --- command side -------------------------------------------------------------------------------


class FakeConnection:
    """Stands for the write-DB connection of one fake transaction, with its undo log."""

    def __init__(self) -> None:
        self.undo: list[Callable[[], None]] = []


@dataclass
class OutboxRow:
    outbox_id: int
    shard: int
    event: TodoEvent
    trace: TraceContext | None


@dataclass
class StoredKey:
    """An idempotency_keys row: the request's fingerprint, its reply once stored, and the transaction
    that holds the row until it commits (None once committed)."""

    fingerprint: bytes
    reply: Reply | None
    holder: FakeConnection | None


class FakeWriteStore:
    """A fake write database, in memory, no service: the todos table, the outbox, the idempotency keys,
    and the database's clock (`now`), with transactions that roll back every change on failure.

    Every write must happen inside `run_in_transaction` with its connection, as against the real store.
    Idempotency keys follow todo_cqrs/command/idempotency.py: a key another transaction holds (or one
    `hold_key` marks as held by another process) is in flight (409); a committed key answers its
    stored reply for the same fingerprint, IdempotencyKeyReused (422) for another.
    """

    SHARDS = 3

    def __init__(self) -> None:
        self.todos: dict[int, Todo] = {}
        self.outbox: list[OutboxRow] = []
        self.keys: dict[bytes, StoredKey] = {}
        self.next_id = 1
        self.next_outbox_id = 1
        self.now = T0 + timedelta(minutes=5)
        self.unreachable = False
        self.fail_in: str | None = None  # the name of a step that raises DependencyUnavailable
        self.transactions = 0
        self._open: set[FakeConnection] = set()
        self._held_elsewhere: set[bytes] = set()
        self._gate: asyncio.Event | None = None
        self.gate_reached = threading.Event()
        self.gated = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeWriteStore:
        for name in ("run_in_transaction", "load_for_update", "insert_todo", "save_todo", "delete_todo"):
            monkeypatch.setattr(write_store, name, getattr(self, name))
        monkeypatch.setattr(write_store, "append_event", self.append_event)
        monkeypatch.setattr(idempotency, "claim", self.claim)
        monkeypatch.setattr(idempotency, "store", self.store_reply)
        return self

    def seed(self, todo: Todo) -> Todo:
        self.todos[todo.id] = todo
        self.next_id = max(self.next_id, todo.id + 1)
        return todo

    @property
    def events(self) -> list[TodoEvent]:
        return [row.event for row in self.outbox]

    def hold_key(self, key: str) -> None:
        """Another process's request with this key is in flight (its transaction holds the key's row)."""
        self._held_elsewhere.add(IdempotencyKey.of(key, "", None, None).key_hash)  # type: ignore[union-attr]

    def pause_inside_transactions(self) -> None:
        """Make the next transactions wait, just after their first step, until `resume` (called on the
        app's event loop); `gate_reached` is set when one is waiting."""
        self.gated = True

    def resume(self) -> None:
        self.gated = False
        if self._gate is not None:
            self._gate.set()

    def _check(self, conn: Any) -> None:
        assert isinstance(conn, FakeConnection) and conn in self._open, "write outside a transaction"

    def _maybe_fail(self, step: str) -> None:
        if self.fail_in == step:
            raise DependencyUnavailable(
                "the write database is unreachable",
                cause=ConnectionResetError(f"fake write DB died in {step}"),
            )

    async def _maybe_wait(self) -> None:
        if self.gated:
            if self._gate is None:
                self._gate = asyncio.Event()
            self.gate_reached.set()
            await self._gate.wait()

    async def run_in_transaction(self, work: Callable[[Any], Awaitable[Any]]) -> Any:
        if self.unreachable:
            raise DependencyUnavailable(
                "the write database is unreachable", cause=ConnectionRefusedError("fake write DB is down")
            )
        conn = FakeConnection()
        self._open.add(conn)
        self.transactions += 1
        try:
            result = await work(conn)
            self._maybe_fail("commit")
        except BaseException:
            for undo in reversed(conn.undo):
                undo()
            raise
        else:
            for stored in self.keys.values():
                if stored.holder is conn:
                    stored.holder = None
            return result
        finally:
            self._open.discard(conn)

    async def load_for_update(self, conn: Any, todo_id: int) -> write_store.Locked | None:
        self._check(conn)
        self._maybe_fail("load_for_update")
        todo = self.todos.get(todo_id)
        return write_store.Locked(todo, self.now, None) if todo is not None else None

    async def insert_todo(self, conn: Any, new: NewTodo) -> Todo:
        self._check(conn)
        self._maybe_fail("insert_todo")
        await self._maybe_wait()
        todo_id, self.next_id = self.next_id, self.next_id + 1  # auto-increment: not given back on rollback
        todo = new.created(todo_id, self.now)
        self.todos[todo_id] = todo
        conn.undo.append(lambda: self.todos.pop(todo_id, None))
        return todo

    async def save_todo(self, conn: Any, todo: Todo) -> None:
        self._check(conn)
        self._maybe_fail("save_todo")
        before = self.todos[todo.id]  # a save of a todo that is not in the table is a bug
        self.todos[todo.id] = todo
        conn.undo.append(lambda: self.todos.__setitem__(todo.id, before))

    async def delete_todo(self, conn: Any, todo_id: int) -> None:
        self._check(conn)
        self._maybe_fail("delete_todo")
        before = self.todos.pop(todo_id, None)
        if before is not None:
            conn.undo.append(lambda: self.todos.__setitem__(todo_id, before))

    async def append_event(self, conn: Any, event: TodoEvent, trace: TraceContext | None) -> OutboxRecord:
        self._check(conn)
        self._maybe_fail("append_event")
        row = OutboxRow(self.next_outbox_id, event.todo_id % self.SHARDS, event, trace)
        self.next_outbox_id += 1
        self.outbox.append(row)
        conn.undo.append(lambda: self.outbox.remove(row))
        return OutboxRecord(
            row.outbox_id,
            event.event_id,
            event.type,
            event.todo_id,
            event.time,
            event.payload.decode(),
            trace.traceparent if trace else None,
            trace.tracestate if trace else None,
        )

    async def claim(self, conn: Any, key: IdempotencyKey) -> Reply | None:
        self._check(conn)
        stored = self.keys.get(key.key_hash)
        if key.key_hash in self._held_elsewhere or (stored is not None and stored.holder not in (None, conn)):
            raise idempotency.in_flight()
        if stored is None:
            self.keys[key.key_hash] = StoredKey(key.fingerprint, None, conn)
            conn.undo.append(lambda: self.keys.pop(key.key_hash, None))
            return None
        if stored.fingerprint != key.fingerprint:
            raise idempotency.reused()
        if stored.reply is None:
            raise idempotency.in_flight()
        return stored.reply

    async def store_reply(self, conn: Any, key: IdempotencyKey, reply: Reply) -> None:
        self._check(conn)
        stored = self.keys[key.key_hash]
        assert stored.holder is conn, "a reply stored under a key this transaction did not claim"
        # As the real table keeps it: headers as JSON text, the body as bytes.
        stored.reply = Reply(reply.status, orjson.loads(orjson.dumps(reply.headers)), bytes(reply.body))


@dataclass
class PublishRecorder:
    """A fake outbox publisher: records `committed(record, after)` (the outbox id, and the pending row it
    must follow) instead of publishing to Kafka."""

    committed_rows: list[tuple[int, int | None]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> PublishRecorder:
        monkeypatch.setattr(command_handlers, "outbox_publisher", lambda: self)
        return self

    @property
    def calls(self) -> int:
        return len(self.committed_rows)

    def committed(self, record: OutboxRecord, after: int | None) -> None:
        self.committed_rows.append((record.outbox_id, after))


# --- query side and event path ------------------------------------------------------------------


@dataclass
class FakeReadModel:
    """A fake read database, in memory, no service: projected todos and tombstones by id, as `get_row`,
    `list_rows` (query side) and `apply_change` (projection) see them.

    `arrive_after(n, change)` lets a projection land after n reads, for the polling min_version wait;
    `fail_with` makes every statement raise that exception (a DataError, a dead server...).
    """

    rows: dict[int, tuple[Todo | None, int]] = field(default_factory=dict)
    unreachable: bool = False
    fail_with: BaseException | None = None
    reads: int = 0
    row_lookups: list[int] = field(default_factory=list)
    list_queries: list[tuple[Status | None, int, int]] = field(default_factory=list)
    applied: list[tuple[Change, datetime]] = field(default_factory=list)
    _arrivals: list[tuple[int, Callable[[], None]]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeReadModel:
        for module in (query_handlers, projection_handlers):
            monkeypatch.setattr(module, "read_connection", self.read_connection)
        monkeypatch.setattr(query_handlers, "get_row", self.get_row)
        monkeypatch.setattr(query_handlers, "list_rows", self.list_rows)
        monkeypatch.setattr(projection_handlers, "apply_change", self.apply_change)
        monkeypatch.setattr(projection_handlers, "apply_changes", self.apply_changes)
        return self

    def put(self, todo: Todo) -> Todo:
        self.rows[todo.id] = (todo, todo.version)
        return todo

    def tombstone(self, todo_id: int, version: int) -> None:
        self.rows[todo_id] = (None, version)

    def version_of(self, todo_id: int) -> int | None:
        return self.rows[todo_id][1] if todo_id in self.rows else None

    def arrive_after(self, reads: int, change: Callable[[], None]) -> None:
        self._arrivals.append((reads, change))

    @asynccontextmanager
    async def read_connection(self) -> AsyncIterator[object]:
        if self.unreachable:
            raise DependencyUnavailable(
                "the read database is unreachable", cause=ConnectionRefusedError("fake read DB is down")
            )
        for due, change in [a for a in self._arrivals if a[0] <= self.reads]:
            change()
            self._arrivals.remove((due, change))
        self.reads += 1
        yield object()

    def _statement(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    async def get_row(self, conn: object, todo_id: int) -> tuple[Todo | None, int | None]:
        self._statement()
        self.row_lookups.append(todo_id)
        return self.rows.get(todo_id, (None, None))

    async def list_rows(self, conn: object, status: Status | None, after_id: int, limit: int) -> list[Todo]:
        self._statement()
        self.list_queries.append((status, after_id, limit))
        live = sorted((t for t, _ in self.rows.values() if t is not None), key=lambda t: t.id)
        return [t for t in live if t.id > after_id and (status is None or t.status == status)][:limit]

    async def apply_changes(self, conn: object, changes: list[tuple[Change, datetime]]) -> list[bool]:
        """Many changes in one statement, each as `apply_change` applies it, in list order."""
        return [await self.apply_change(conn, change, moment) for change, moment in changes]

    async def apply_change(self, conn: object, change: Change, event_time: datetime) -> bool:
        """The upsert gated by version: only a newer version moves the row; a deletion is a tombstone."""
        self._statement()
        held = self.version_of(change.todo_id)
        if held is not None and held >= change.version:
            return False
        self.rows[change.todo_id] = (change.todo, change.version)
        self.applied.append((change, event_time))
        return True


@dataclass
class FakeCache:
    """A fake Redis cache, in memory, no service: todos by id, list pages by (generation, page), and the
    projection's invalidations (a marker version per todo, a list generation bump, a notice)."""

    todos: dict[int, CachedTodo] = field(default_factory=dict)
    pages: dict[tuple[bytes, str], bytes] = field(default_factory=dict)
    generation: int = 0
    stored_todos: list[tuple[int, int]] = field(default_factory=list)
    stored_pages: list[str] = field(default_factory=list)
    invalidations: list[tuple[int, int, str | None]] = field(default_factory=list)
    markers: dict[int, int] = field(default_factory=dict)
    watch: FakeVersionWatch | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeCache:
        for module in (query_handlers, projection_handlers):
            monkeypatch.setattr(module, "todo_cache", lambda: self)
        return self

    async def get_todo(self, todo_id: int) -> CachedTodo | None:
        return self.todos.get(todo_id)

    async def store_todo(self, todo_id: int, version: int, body: bytes) -> None:
        self.stored_todos.append((todo_id, version))
        current = self.todos.get(todo_id)
        if (current is None or current.version < version) and self.markers.get(todo_id, 0) <= version:
            self.todos[todo_id] = CachedTodo(version, body)

    async def get_list(self, page: str) -> tuple[bytes, bytes | None]:
        generation = str(self.generation).encode()
        return generation, self.pages.get((generation, page))

    async def store_list(self, generation: bytes, page: str, body: bytes) -> None:
        self.stored_pages.append(page)
        self.pages[(generation, page)] = body

    async def invalidate_many(self, changes: list[tuple[int, int, str | None]]) -> None:
        for change in changes:
            await self.invalidate(*change)

    async def invalidate(self, todo_id: int, version: int, traceparent: str | None = None) -> None:
        self.invalidations.append((todo_id, version, traceparent))
        self.todos.pop(todo_id, None)
        self.markers[todo_id] = max(self.markers.get(todo_id, 0), version)
        self.generation += 1
        if self.watch is not None:
            self.watch.notice(todo_id, version, traceparent or "")


class UnreachableCache(FakeCache):
    """A fake cache whose Redis does not answer: reads raise CacheUnavailable (the reader must bypass),
    an invalidation raises DependencyUnavailable (the projection must answer 503)."""

    async def get_todo(self, todo_id: int) -> CachedTodo | None:
        raise CacheUnavailable("fake redis is down")

    async def get_list(self, page: str) -> tuple[bytes, bytes | None]:
        raise CacheUnavailable("fake redis is down")

    async def invalidate(self, todo_id: int, version: int, traceparent: str | None = None) -> None:
        raise DependencyUnavailable(
            "redis is unreachable", cause=ConnectionRefusedError("fake redis is down")
        )

    async def invalidate_many(self, changes: list[tuple[int, int, str | None]]) -> None:
        await self.invalidate(*changes[0])


@dataclass
class FakeVersionWatch:
    """A fake of the subscription to the projection's notices (VersionWatch), in memory, no Redis.

    `healthy` False stands for a subscription that is down (readers then poll the read model).
    `land_when_waited(todo_id, projection)` runs `projection` (which lands a version in the fake read
    model and invalidates the fake cache, whose notice resolves the waiter) once a reader waits for
    that todo, on the event loop, after the reader's current step.
    """

    healthy: bool = True
    waiting: dict[int, list[tuple[int, asyncio.Future[str]]]] = field(default_factory=dict)
    waits: list[tuple[int, int]] = field(default_factory=list)
    _landings: dict[int, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeVersionWatch:
        monkeypatch.setattr(query_handlers, "version_watch", lambda: self)
        return self

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


# --- dead letters -------------------------------------------------------------------------------


@dataclass
class FakeDeadLetterStore:
    """A fake dead-letter store, in memory, no service (no S3, no directory)."""

    letters: dict[str, DeadLetter] = field(default_factory=dict)
    unreachable: bool = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeDeadLetterStore:
        monkeypatch.setattr(dead_letter, "from_settings", lambda: self)
        return self

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


# --- the relay ---------------------------------------------------------------------------------


@dataclass
class FakeRelay:
    """A fake outbox relay and key purge, in memory, no service: `pending` rows get published by the
    next drain, `expired` keys deleted by the next purge. Install it before relay_outbox's main.py is
    loaded: main.py imports `tick_relay` and `purge_expired` by name."""

    pending: int = 0
    expired: int = 0
    unreachable: bool = False
    drains: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeRelay:
        monkeypatch.setattr(relay, "tick_relay", lambda: self)
        monkeypatch.setattr(idempotency, "purge_expired", self.purge_expired)
        return self

    def reset(self) -> FakeRelay:
        self.pending = self.expired = self.drains = 0
        self.unreachable = False
        return self

    async def drain_all(self, wait_s: float = 0.0) -> int:
        if self.unreachable:
            raise DependencyUnavailable(
                "the write database is unreachable", cause=ConnectionRefusedError("fake write DB is down")
            )
        self.drains += 1
        published, self.pending = self.pending, 0
        return published

    async def purge_expired(self) -> int:
        expired, self.expired = self.expired, 0
        return expired


# --- every function on fakes --------------------------------------------------------------------


@dataclass
class Fakes:
    """One fake of every dependency of every function."""

    store: FakeWriteStore = field(default_factory=FakeWriteStore)
    published: PublishRecorder = field(default_factory=PublishRecorder)
    read_model: FakeReadModel = field(default_factory=FakeReadModel)
    watch: FakeVersionWatch = field(default_factory=FakeVersionWatch)
    cache: FakeCache = field(default_factory=FakeCache)
    letters: FakeDeadLetterStore = field(default_factory=FakeDeadLetterStore)
    relay: FakeRelay = field(default_factory=FakeRelay)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Fakes:
        self.cache.watch = self.watch
        for fake in (
            self.store,
            self.published,
            self.read_model,
            self.watch,
            self.cache,
            self.letters,
            self.relay,
        ):
            fake.install(monkeypatch)
        return self

    def seed(self, *todos: Todo) -> None:
        """The same todos in the write model and (projected) in the read model."""
        for todo in todos:
            self.store.seed(todo)
            self.read_model.put(todo)

    def outage(self) -> None:
        """Every dependency down at once."""
        self.store.unreachable = self.read_model.unreachable = True
        self.letters.unreachable = self.relay.unreachable = True
        self.watch.healthy = False


@contextmanager
def faked_function(name: str) -> Iterator[tuple[TestClient, Fakes]]:
    """functions/<name>/main.py loaded with every dependency faked (fresh fakes: `Fakes().install`
    again on a MonkeyPatch of a test replaces them for that test)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        fakes = Fakes().install(monkeypatch)
        with function_client(name) as client:
            yield client, fakes


# --- events -------------------------------------------------------------------------------------

CREATED, UPDATED, DELETED = "todo.created.v1", "todo.updated.v1", "todo.deleted.v1"


def todo_data(todo_id: int, version: int, **fields: Any) -> dict[str, Any]:
    """The data of a created/updated event: the whole todo at that version."""
    return {**a_todo(todo_id, version=version, title=f"v{version}").to_dict(), **fields}


def binary_event(event_type: str, data: Any, **headers: str) -> tuple[dict[str, str], bytes]:
    """Headers and body of a binary-mode CloudEvent, as a KafkaSource POSTs it; data JSON-encoded
    unless it is bytes already."""
    subject = str(data.get("id", "")) if isinstance(data, dict) else ""
    event_headers = {
        "ce-specversion": "1.0",
        "ce-id": str(uuid.uuid4()),
        "ce-source": "/todo-cqrs/commands",
        "ce-type": event_type,
        "ce-subject": subject,
        "ce-time": "2026-11-27T10:01:00.000Z",
        "content-type": "application/json",
        **headers,
    }
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return event_headers, body


def structured_event(event_type: str, data: Any, **attributes: Any) -> tuple[dict[str, str], bytes]:
    """Headers and body of a structured-mode CloudEvent (the envelope as JSON)."""
    envelope = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/todo-cqrs/commands",
        "type": event_type,
        "datacontenttype": "application/json",
        "data": data,
        **attributes,
    }
    return {"content-type": "application/cloudevents+json"}, json.dumps(envelope).encode()
