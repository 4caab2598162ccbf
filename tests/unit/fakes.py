"""In-memory fakes of the core's async I/O, so the functions run through functions-framework with no service.

Only the adapters are faked (the write store and its idempotency keys, the outbox publisher, the read
store, the cache and its version notices, the dead-letter store); the functions, the HTTP edge, the
handlers and the domain under test are always the real ones. A test passes the fakes in: a function is
built by its main.py's `build` with them (`load_main(name).build(...)`), nothing is patched. The read
side's fakes are in tests/unit/fakes_read.py; tests/contract holds every fake to its adapter's behaviour.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import functions_framework.aio
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.unit.fakes_read import (
    FakeCache,
    FakeDeadLetterStore,
    FakeReadStore,
    FakeVersionWatch,
    fake_projection,
    fake_queries,
)
from todo_cqrs import logs, serve
from todo_cqrs.adapters.publisher import OutboxRecord
from todo_cqrs.command import idempotency
from todo_cqrs.command.handlers import Commands
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.command.unit_of_work import Locked, Outcome, Stored, ToPublish
from todo_cqrs.dead_letter import DeadLetters
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.domain.events import TodoEvent
from todo_cqrs.domain.todo import NewTodo, Status, Todo
from todo_cqrs.outbox.relay import RelayTick
from todo_cqrs.sender_identity import NoCheck
from todo_cqrs.tracing import TraceContext

T = TypeVar("T")
FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"
HTTP_FUNCTIONS = ("create_todo", "update_todo", "delete_todo", "get_todos", "relay_outbox")
EVENT_SINKS = ("project_event", "dead_letter")
ALL_FUNCTIONS = HTTP_FUNCTIONS + EVENT_SINKS
T0 = datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)
_FRAMEWORK_ENV = ("FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE")


@contextmanager
def function_app(name: str) -> Iterator[serve.ASGIApp]:
    """functions/<name>/main.py as `make run` and the images serve it (todo_cqrs/serve.py): the function's
    requests straight to it, the rest to functions-framework's own app.

    Loading executes the source file afresh on every call, registers it as sys.modules["main"],
    appends its folder to sys.path and sets FUNCTION_TARGET (and FUNCTION_SIGNATURE_TYPE): load it once
    per test module, and undo those process-wide traces afterwards so the next module starts clean.
    """
    saved_path, saved_main = list(sys.path), sys.modules.get("main")
    saved_env = {variable: os.environ.get(variable) for variable in _FRAMEWORK_ENV}
    try:
        yield serve.load(name, str(FUNCTIONS_DIR / name / "main.py"))
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


@dataclass
class OutboxRow:
    outbox_id: int
    shard: int
    event: TodoEvent
    trace: TraceContext | None
    published: bool = False


@dataclass
class StoredKey:
    """An idempotency_keys row: the request's fingerprint, its outcome once kept, and the unit of work
    that holds the row until it commits (None once committed)."""

    fingerprint: str
    stored: Stored | None
    holder: FakeUnitOfWork | None


class FakeUnitOfWork:
    """One transaction of the fake write store, with its undo log (todo_cqrs/command/unit_of_work.py)."""

    def __init__(self, store: FakeWriteStore) -> None:
        self._store = store
        self.undo: list[Callable[[], None]] = []
        self.events: list[tuple[TodoEvent, int | None]] = []
        self.pending: dict[int, int | None] = {}
        self.open = True

    def _step(self, name: str) -> None:
        assert self.open, "a write outside its unit of work"
        self._store.maybe_fail(name)

    async def claim(self, key: IdempotencyKey) -> Stored | None:
        self._step("claim")
        keys = self._store.keys
        held = keys.get(key.key_hash)
        if key.key_hash in self._store.held_elsewhere or (
            held is not None and held.holder not in (None, self)
        ):
            raise idempotency.in_flight()
        if held is None:
            keys[key.key_hash] = StoredKey(key.fingerprint, None, self)
            self.undo.append(lambda: keys.pop(key.key_hash, None))
            return None
        if held.fingerprint != key.fingerprint:
            raise idempotency.reused()
        if held.stored is None:
            raise idempotency.in_flight()
        return held.stored

    async def keep(self, key: IdempotencyKey, outcome: Outcome, todo: Todo) -> None:
        self._step("keep")
        held = self._store.keys[key.key_hash]
        assert held.holder is self, "an outcome kept under a key this unit of work did not claim"
        # As the real table keeps it: the todo as JSON, read back.
        held.stored = Stored(outcome, Todo.from_dict(orjson.loads(orjson.dumps(todo.to_dict()))))

    async def insert(self, new: NewTodo) -> Todo:
        self._step("insert")
        await self._store.maybe_wait()
        store = self._store
        todo_id, store.next_id = store.next_id, store.next_id + 1  # auto-increment: not given back
        todo = new.created(todo_id, store.now)
        store.todos[todo_id] = todo
        self.undo.append(lambda: store.todos.pop(todo_id, None))
        return todo

    async def lock(self, todo_id: int) -> Locked | None:
        self._step("lock")
        todo = self._store.todos.get(todo_id)
        if todo is None:
            return None
        pending = [
            row.outbox_id for row in self._store.outbox if row.event.todo_id == todo_id and not row.published
        ]
        self.pending[todo_id] = max(pending, default=None)
        return Locked(todo, self._store.now)

    async def save(self, todo: Todo) -> None:
        self._step("save")
        todos = self._store.todos
        before = todos[todo.id]  # a save of a todo that is not in the table is a bug
        todos[todo.id] = todo
        self.undo.append(lambda: todos.__setitem__(todo.id, before))

    async def delete(self, todo_id: int) -> None:
        self._step("delete")
        todos = self._store.todos
        before = todos.pop(todo_id, None)
        if before is not None:
            self.undo.append(lambda: todos.__setitem__(todo_id, before))

    def add_event(self, event: TodoEvent) -> None:
        assert self.open, "an event outside its unit of work"
        self.events.append((event, self.pending.get(event.todo_id)))

    def append_events(self, trace: TraceContext | None) -> list[ToPublish]:
        self._step("append_events")
        store = self._store
        appended = []
        for event, after in self.events:
            row = OutboxRow(store.next_outbox_id, event.todo_id % store.SHARDS, event, trace)
            store.next_outbox_id += 1
            store.outbox.append(row)
            self.undo.append(lambda row=row: store.outbox.remove(row))  # type: ignore[misc]
            record = OutboxRecord(
                row.outbox_id,
                event.event_id,
                event.type,
                event.todo_id,
                event.time,
                event.payload.decode(),
                trace.traceparent if trace else None,
                trace.tracestate if trace else None,
            )
            appended.append(ToPublish(record, after))
        return appended


class FakeWriteStore:
    """A fake write database, in memory, no service: the todos table, the outbox, the idempotency keys,
    and the database's clock (`now`), with units of work that roll back every change on failure.

    It keeps the rules of the MariaDB store (tests/contract/test_write_store_contract.py runs the same
    cases on both): a key another unit of work holds (or one `hold_key` marks as held by another
    process) is in flight (409); a committed key gives its stored outcome for the same fingerprint,
    IdempotencyKeyReused (422) for another; an event follows its todo's newest unpublished row.
    """

    SHARDS = 3

    def __init__(self) -> None:
        self.todos: dict[int, Todo] = {}
        self.outbox: list[OutboxRow] = []
        self.keys: dict[str, StoredKey] = {}
        self.next_id = 1
        self.next_outbox_id = 1
        self.now = T0 + timedelta(minutes=5)
        self.unreachable = False
        self.fail_in: str | None = None  # the name of a step that raises DependencyUnavailable
        self.transactions = 0
        self.expired_keys = 0  # deleted by the next purge
        self.held_elsewhere: set[str] = set()
        self._gate: asyncio.Event | None = None
        self.gate_reached = threading.Event()
        self.gated = False

    def seed(self, todo: Todo) -> Todo:
        self.todos[todo.id] = todo
        self.next_id = max(self.next_id, todo.id + 1)
        return todo

    @property
    def events(self) -> list[TodoEvent]:
        return [row.event for row in self.outbox]

    def mark_published(self, outbox_ids: Iterable[int]) -> None:
        ids = set(outbox_ids)
        for row in self.outbox:
            if row.outbox_id in ids:
                row.published = True

    def hold_key(self, key: str) -> None:
        """Another process's request with this key is in flight (its transaction holds the key's row)."""
        self.held_elsewhere.add(IdempotencyKey.of(key, "", None, None).key_hash)  # type: ignore[union-attr]

    def pause_inside_transactions(self) -> None:
        """Make the next units of work wait, just after their first step, until `resume` (called on the
        app's event loop); `gate_reached` is set when one is waiting."""
        self.gated = True

    def resume(self) -> None:
        self.gated = False
        if self._gate is not None:
            self._gate.set()

    def maybe_fail(self, step: str) -> None:
        if self.fail_in == step:
            raise DependencyUnavailable(
                "the write database is unreachable",
                cause=ConnectionResetError(f"fake write DB died in {step}"),
            )

    async def maybe_wait(self) -> None:
        if self.gated:
            if self._gate is None:
                self._gate = asyncio.Event()
            self.gate_reached.set()
            await self._gate.wait()

    async def run(
        self, work: Callable[[FakeUnitOfWork], Awaitable[T]], trace: TraceContext | None
    ) -> tuple[T, list[ToPublish]]:
        if self.unreachable:
            raise DependencyUnavailable(
                "the write database is unreachable", cause=ConnectionRefusedError("fake write DB is down")
            )
        uow = FakeUnitOfWork(self)
        self.transactions += 1
        try:
            result = await work(uow)
            appended = uow.append_events(trace)
            self.maybe_fail("commit")
        except BaseException:
            for undo in reversed(uow.undo):
                undo()
            raise
        finally:
            uow.open = False
        for held in self.keys.values():
            if held.holder is uow:
                held.holder = None
        return result, appended

    async def purge_expired_keys(self, budget_s: float = 2.0) -> int:
        if self.unreachable:
            raise DependencyUnavailable(
                "the write database is unreachable", cause=ConnectionRefusedError("fake write DB is down")
            )
        expired, self.expired_keys = self.expired_keys, 0
        return expired

    async def aclose(self) -> None:
        pass


@dataclass
class PublishRecorder:
    """A fake outbox publisher: records `committed(record, after)` (the outbox id, and the pending row it
    must follow) instead of publishing to Kafka."""

    committed_rows: list[tuple[int, int | None]] = field(default_factory=list)
    warm_ups: int = 0

    @property
    def calls(self) -> int:
        return len(self.committed_rows)

    def committed(self, record: OutboxRecord, after: int | None) -> None:
        self.committed_rows.append((record.outbox_id, after))

    def warm_up(self) -> None:
        self.warm_ups += 1

    async def aclose(self) -> None:
        pass


def fake_commands(store: FakeWriteStore | None = None, published: PublishRecorder | None = None) -> Commands:
    """A command function's dependencies, in memory."""
    return Commands(store or FakeWriteStore(), published or PublishRecorder())


# --- the relay ---------------------------------------------------------------------------------


@dataclass
class FakeRelay:
    """A fake outbox relay, in memory, no service: `pending` rows get published by the next drain."""

    pending: int = 0
    unreachable: bool = False
    drains: int = 0

    async def drain_all(self, wait_s: float = 0.0) -> int:
        if self.unreachable:
            raise DependencyUnavailable(
                "the write database is unreachable", cause=ConnectionRefusedError("fake write DB is down")
            )
        self.drains += 1
        published, self.pending = self.pending, 0
        return published

    async def aclose(self) -> None:
        pass


# --- every function on fakes --------------------------------------------------------------------


@dataclass
class Fakes:
    """One fake of every dependency of every function; `deps(name)` is a function's, over these fakes."""

    store: FakeWriteStore = field(default_factory=FakeWriteStore)
    published: PublishRecorder = field(default_factory=PublishRecorder)
    read_model: FakeReadStore = field(default_factory=FakeReadStore)
    watch: FakeVersionWatch = field(default_factory=FakeVersionWatch)
    cache: FakeCache = field(default_factory=FakeCache)
    letters: FakeDeadLetterStore = field(default_factory=FakeDeadLetterStore)
    relay: FakeRelay = field(default_factory=FakeRelay)

    def __post_init__(self) -> None:
        self.cache.watch = self.watch

    def deps(self, name: str) -> Any:
        """What functions/<name>/main.py's `build` takes, made of these fakes."""
        if name in ("create_todo", "update_todo", "delete_todo"):
            return fake_commands(self.store, self.published)
        if name == "relay_outbox":
            return RelayTick(self.relay, self.store, lambda: None, NoCheck)
        if name == "get_todos":
            return fake_queries(self.read_model, self.cache, self.watch)
        if name == "project_event":
            return fake_projection(self.read_model, self.cache)
        if name == "dead_letter":
            return DeadLetters(self.letters)
        raise ValueError(f"no fakes for {name}")

    def reset(self) -> Fakes:
        """Every fake back to its fresh state, in place: a function built with them sees fresh fakes."""
        for fake in (
            self.store,
            self.published,
            self.read_model,
            self.watch,
            self.cache,
            self.letters,
            self.relay,
        ):
            fake.__init__()  # type: ignore[misc]
        self.cache.watch = self.watch
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


def framework_app_of(name: str, function: Callable[[Request], Awaitable[Response]]) -> serve.ASGIApp:
    """A function built with fakes, served as functions/<name>/main.py is (todo_cqrs/serve.py): straight
    to it, and functions-framework's own app (its public create_asgi_app_from_module) for the rest."""
    module = ModuleType(f"{name}_built")

    async def entry(request: Request) -> Response:
        return await function(request)

    setattr(module, name, entry)
    app: Starlette = functions_framework.aio.create_asgi_app_from_module(
        name, f"functions/{name}/main.py", "http", module, None
    )
    return serve.direct(entry, app)


@contextmanager
def faked_function(name: str, fakes: Fakes | None = None) -> Iterator[tuple[TestClient, Fakes]]:
    """functions/<name>/main.py built with fakes (these, or fresh ones) and served by functions-framework's
    own app; `fakes.reset()` gives a test fresh ones."""
    fakes = fakes or Fakes()
    with TestClient(framework_app_of(name, load_main(name).build(fakes.deps(name)))) as client:
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
