"""The write database: the todos table and the transactional outbox beside it."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import DATETIME
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from todo_cqrs.db import is_deadlock, transaction, unavailable, write_engine
from todo_cqrs.domain.events import TodoEvent
from todo_cqrs.domain.todo import Status, Todo

T = TypeVar("T")
metadata = sa.MetaData()
Millis = DATETIME(fsp=3)

todos = sa.Table(
    "todos",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("title", sa.String(255), nullable=False),
    sa.Column("description", sa.String(2000), nullable=False, server_default=""),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("updated_at", Millis, nullable=False),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
)

# One row per committed change. Rows stay after publishing: they are the history a rebuild replays.
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(36), nullable=False, unique=True),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("todo_id", sa.BigInteger, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("occurred_at", Millis, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("published_at", Millis, nullable=True),
    # The relay's scan: pending rows in id order.
    sa.Index("ix_outbox_pending", "published_at", "id"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
)

# Built once: a statement object per call would be compiled (cache-keyed) again on every command.
_INSERT_TODO = sa.insert(todos)
_INSERT_EVENT = sa.insert(outbox)


DEADLOCK_RETRIES = 3


def naive_utc(moment: datetime) -> datetime:
    """DATETIME columns hold UTC without a zone."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)


def todo_from_row(row: Any) -> Todo:
    return Todo(
        id=row.id,
        title=row.title,
        description=row.description,
        status=Status(row.status),
        version=row.version,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


def todo_values(todo: Todo) -> dict[str, Any]:
    return {
        "title": todo.title,
        "description": todo.description,
        "status": todo.status.value,
        "version": todo.version,
        "created_at": naive_utc(todo.created_at),
        "updated_at": naive_utc(todo.updated_at),
    }


def write_transaction() -> AbstractContextManager[Connection]:
    """One write-DB transaction; an unreachable database becomes DependencyUnavailable."""
    return transaction(write_engine(), "write")


def run_in_transaction(work: Callable[[Connection], T]) -> T:
    """Run `work(conn)` in a write transaction, again on a deadlock (its effects were rolled back)."""
    for attempt in itertools.count():
        try:
            with write_transaction() as conn:
                return work(conn)
        except DBAPIError as exc:
            if not is_deadlock(exc):
                raise
            if attempt >= DEADLOCK_RETRIES:
                raise unavailable("write", exc) from exc
    raise AssertionError("unreachable")


def load_for_update(conn: Connection, todo_id: int) -> Todo | None:
    """The todo, row-locked until commit: concurrent commands on one todo run one after another."""
    row = conn.execute(sa.select(todos).where(todos.c.id == todo_id).with_for_update()).first()
    return todo_from_row(row) if row else None


def insert_todo(conn: Connection, values: dict[str, Any]) -> int:
    result = conn.execute(_INSERT_TODO, values)
    return int(result.lastrowid)


def save_todo(conn: Connection, todo: Todo) -> None:
    conn.execute(sa.update(todos).where(todos.c.id == todo.id).values(**todo_values(todo)))


def delete_todo(conn: Connection, todo_id: int) -> None:
    conn.execute(sa.delete(todos).where(todos.c.id == todo_id))


def append_event(conn: Connection, event: TodoEvent) -> None:
    """Add the event to the outbox in the caller's transaction: it commits with the change or not at all."""
    conn.execute(
        _INSERT_EVENT,
        {
            "event_id": event.event_id,
            "event_type": event.type,
            "todo_id": event.todo_id,
            "version": event.version,
            "occurred_at": naive_utc(event.time),
            "payload": event.payload.decode(),
        },
    )
