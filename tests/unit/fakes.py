"""In-memory fakes of the core's I/O, so the functions run through functions-framework with no service.

Only the adapters are faked (the write store, the publish after commit, the read store, the cache);
the functions, the HTTP edge, the handlers and the domain under test are always the real ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from todo_cqrs.adapters import write_store
from todo_cqrs.adapters.cache import CachedTodo, CacheUnavailable
from todo_cqrs.command import handlers as command_handlers
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.domain.events import TodoEvent
from todo_cqrs.domain.todo import Status, Todo
from todo_cqrs.query import handlers as query_handlers

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"
T0 = datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)


@contextmanager
def function_client(name: str) -> Iterator[FlaskClient]:
    """A test client of functions/<name>/main.py, loaded by functions-framework's own create_app.

    create_app executes the source file afresh on every call, registers it as sys.modules["main"],
    appends its folder to sys.path and sets FUNCTION_TARGET: load it once per test module, and undo
    those process-wide traces afterwards so the next module starts clean.
    """
    saved_path, saved_main = list(sys.path), sys.modules.get("main")
    saved_target = os.environ.get("FUNCTION_TARGET")
    try:
        yield create_app(target=name, source=str(FUNCTIONS_DIR / name / "main.py")).test_client()
    finally:
        sys.path[:] = saved_path
        if saved_main is None:
            sys.modules.pop("main", None)
        else:
            sys.modules["main"] = saved_main
        if saved_target is None:
            os.environ.pop("FUNCTION_TARGET", None)
        else:
            os.environ["FUNCTION_TARGET"] = saved_target


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


# --- command side -------------------------------------------------------------------------------


class _FakeConnection:
    """Stands for the write-DB connection of one fake transaction."""


class FakeWriteStore:
    """A fake write database: the todos table and the outbox in memory, with transactions that roll back.

    Every write must happen inside `run_in_transaction` with its connection, as against the real store.
    """

    def __init__(self) -> None:
        self.todos: dict[int, Todo] = {}
        self.outbox: list[TodoEvent] = []
        self.next_id = 1
        self.unreachable = False
        self._conn: _FakeConnection | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeWriteStore:
        for name in (
            "run_in_transaction",
            "load_for_update",
            "insert_todo",
            "save_todo",
            "delete_todo",
            "append_event",
        ):
            monkeypatch.setattr(write_store, name, getattr(self, name))
        return self

    def seed(self, todo: Todo) -> Todo:
        self.todos[todo.id] = todo
        self.next_id = max(self.next_id, todo.id + 1)
        return todo

    def _check(self, conn: Any) -> None:
        assert conn is not None and conn is self._conn, "write outside the transaction's connection"

    def run_in_transaction(self, work: Callable[[Any], Any]) -> Any:
        if self.unreachable:
            raise DependencyUnavailable(
                "the write database is unreachable", cause=ConnectionRefusedError("fake write DB is down")
            )
        before = (dict(self.todos), list(self.outbox), self.next_id)
        self._conn = _FakeConnection()
        try:
            return work(self._conn)
        except BaseException:
            self.todos, self.outbox, self.next_id = before[0], before[1], before[2]
            raise
        finally:
            self._conn = None

    def load_for_update(self, conn: Any, todo_id: int) -> Todo | None:
        self._check(conn)
        return self.todos.get(todo_id)

    def insert_todo(self, conn: Any, values: dict[str, Any]) -> int:
        self._check(conn)
        todo_id, self.next_id = self.next_id, self.next_id + 1
        self.todos[todo_id] = Todo(
            id=todo_id,
            title=values["title"],
            description=values["description"],
            status=Status(values["status"]),
            version=values["version"],
            created_at=write_store.as_utc(values["created_at"]),
            updated_at=write_store.as_utc(values["updated_at"]),
        )
        return todo_id

    def save_todo(self, conn: Any, todo: Todo) -> None:
        self._check(conn)
        assert todo.id in self.todos, "save of a todo that is not in the table"
        self.todos[todo.id] = todo

    def delete_todo(self, conn: Any, todo_id: int) -> None:
        self._check(conn)
        self.todos.pop(todo_id, None)

    def append_event(self, conn: Any, event: TodoEvent) -> None:
        self._check(conn)
        self.outbox.append(event)


@dataclass
class PublishRecorder:
    """A fake `publish_after_commit`: counts the calls instead of draining the outbox to Kafka."""

    calls: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> PublishRecorder:
        monkeypatch.setattr(command_handlers, "publish_after_commit", self)
        return self

    def __call__(self) -> None:
        self.calls += 1


# --- query side ---------------------------------------------------------------------------------


@dataclass
class FakeReadModel:
    """A fake read database: projected todos and tombstones by id, as `get_row` and `list_rows` see them.

    `arrive_after(n, ...)` lets a projection land after n reads, for the min_version wait.
    """

    rows: dict[int, tuple[Todo | None, int]] = field(default_factory=dict)
    unreachable: bool = False
    reads: int = 0
    list_queries: list[tuple[Status | None, int, int]] = field(default_factory=list)
    _arrivals: list[tuple[int, Callable[[], None]]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeReadModel:
        monkeypatch.setattr(query_handlers, "read_connection", self.read_connection)
        monkeypatch.setattr(query_handlers, "get_row", self.get_row)
        monkeypatch.setattr(query_handlers, "list_rows", self.list_rows)
        return self

    def put(self, todo: Todo) -> Todo:
        self.rows[todo.id] = (todo, todo.version)
        return todo

    def tombstone(self, todo_id: int, version: int) -> None:
        self.rows[todo_id] = (None, version)

    def arrive_after(self, reads: int, change: Callable[[], None]) -> None:
        self._arrivals.append((reads, change))

    @contextmanager
    def read_connection(self) -> Iterator[object]:
        if self.unreachable:
            raise DependencyUnavailable(
                "the read database is unreachable", cause=ConnectionRefusedError("fake read DB is down")
            )
        for due, change in [a for a in self._arrivals if a[0] <= self.reads]:
            change()
            self._arrivals.remove((due, change))
        self.reads += 1
        yield object()

    def get_row(self, conn: object, todo_id: int) -> tuple[Todo | None, int | None]:
        return self.rows.get(todo_id, (None, None))

    def list_rows(self, conn: object, status: Status | None, after_id: int, limit: int) -> list[Todo]:
        self.list_queries.append((status, after_id, limit))
        live = sorted((t for t, _ in self.rows.values() if t is not None), key=lambda t: t.id)
        return [t for t in live if t.id > after_id and (status is None or t.status == status)][:limit]


@dataclass
class FakeCache:
    """A fake Redis cache of the query side: todos by id, list pages by (generation, page)."""

    todos: dict[int, CachedTodo] = field(default_factory=dict)
    pages: dict[tuple[bytes, str], bytes] = field(default_factory=dict)
    generation: bytes = b"0"
    stored_todos: list[tuple[int, int]] = field(default_factory=list)
    stored_pages: list[str] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeCache:
        monkeypatch.setattr(query_handlers, "todo_cache", lambda: self)
        return self

    def get_todo(self, todo_id: int) -> CachedTodo | None:
        return self.todos.get(todo_id)

    def store_todo(self, todo_id: int, version: int, body: bytes) -> None:
        self.stored_todos.append((todo_id, version))
        current = self.todos.get(todo_id)
        if current is None or current.version < version:
            self.todos[todo_id] = CachedTodo(version, body)

    def get_list(self, page: str) -> tuple[bytes, bytes | None]:
        return self.generation, self.pages.get((self.generation, page))

    def store_list(self, generation: bytes, page: str, body: bytes) -> None:
        self.stored_pages.append(page)
        self.pages[(generation, page)] = body


class UnreachableCache(FakeCache):
    """A fake cache whose Redis does not answer: reads raise CacheUnavailable (the handler must bypass)."""

    def get_todo(self, todo_id: int) -> CachedTodo | None:
        raise CacheUnavailable("fake redis is down")

    def get_list(self, page: str) -> tuple[bytes, bytes | None]:
        raise CacheUnavailable("fake redis is down")


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """Check the contract's error body {"error": {"code", "message", "details"}}; return the error."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)
    return error
