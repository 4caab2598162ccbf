"""The write database: the todos table, the transactional outbox beside it, and the outbox's shard leases.

Every moment of a change (`created_at`, `updated_at`, the event's time) is the database's
`UTC_TIMESTAMP(3)`, read inside the change's transaction: pods with skewed clocks cannot make a todo
go back in time. Idempotency keys live here too (todo_cqrs/command/idempotency.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import DATETIME, MEDIUMTEXT
from sqlalchemy.ext.asyncio import AsyncConnection

from todo_cqrs import db
from todo_cqrs.adapters.publisher import OutboxRecord
from todo_cqrs.adapters.rows import todo_from_row
from todo_cqrs.domain.clock import as_utc, naive_utc
from todo_cqrs.domain.events import TodoEvent
from todo_cqrs.domain.todo import NewTodo, Status, Todo
from todo_cqrs.settings import settings
from todo_cqrs.tracing import TraceContext

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

# One row per committed change; published rows are pruned after OUTBOX_RETENTION_HOURS (reconcile).
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
    # todo_id modulo OUTBOX_SHARDS: one todo's rows are in one shard, drained by one lease holder.
    sa.Column("shard", sa.SmallInteger, nullable=False, server_default="0"),
    # The command's W3C trace context, carried by its event (ce_traceparent, ce_tracestate).
    sa.Column("traceparent", sa.String(55), nullable=True),
    sa.Column("tracestate", sa.String(512), nullable=True),
    sa.Index("ix_outbox_pending", "published_at", "id"),
    sa.Index("ix_outbox_shard_pending", "shard", "published_at", "id"),
    sa.Index("ix_outbox_todo_pending", "todo_id", "published_at"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
)

# Who drains which shard of orphaned rows, until when (todo_cqrs/outbox/leases.py).
outbox_leases = sa.Table(
    "outbox_leases",
    metadata,
    sa.Column("shard", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("holder", sa.String(64), nullable=True),
    sa.Column("expires_at", Millis, nullable=False),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("key_hash", sa.CHAR(64), primary_key=True),
    sa.Column("fingerprint", sa.CHAR(64), nullable=False),
    sa.Column("status", sa.SmallInteger, nullable=True),
    sa.Column("headers", sa.Text, nullable=True),
    sa.Column("body", MEDIUMTEXT, nullable=True),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("expires_at", Millis, nullable=False),
    sa.Index("ix_idempotency_keys_expires", "expires_at"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
)

# Built once: a statement object per call would be compiled (cache-keyed) again on every command.
_INSERT_TODO = sa.text(
    "INSERT INTO todos (title, description, status, version, created_at, updated_at) "
    "VALUES (:title, :description, :status, 1, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3)) "
    "RETURNING id, created_at"
)
_LOAD_FOR_UPDATE = sa.text(
    "SELECT id, title, description, status, version, created_at, updated_at, UTC_TIMESTAMP(3) AS now "
    "FROM todos WHERE id = :id FOR UPDATE"
)
# Its own statement, once the row lock is held: a subquery of the locking SELECT would read the outbox
# as it was when that statement began, before the command it waited for had committed its row.
_PENDING_EVENT = sa.text("SELECT MAX(id) FROM outbox WHERE todo_id = :id AND published_at IS NULL")
_SAVE_TODO = sa.text(
    "UPDATE todos SET title = :title, description = :description, status = :status, version = :version, "
    "updated_at = :updated_at WHERE id = :id"
)
_DELETE_TODO = sa.text("DELETE FROM todos WHERE id = :id")
_INSERT_EVENT = sa.insert(outbox)


def todo_values(todo: Todo) -> dict[str, Any]:
    return {
        "title": todo.title,
        "description": todo.description,
        "status": todo.status.value,
        "version": todo.version,
        "created_at": naive_utc(todo.created_at),
        "updated_at": naive_utc(todo.updated_at),
    }


async def run_in_transaction(work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """`await work(conn)` in a write transaction, again on a deadlock; 503 when the DB is unreachable."""
    return await db.run_in_transaction(db.write_engine(), "write", work)


@dataclass(frozen=True)
class Locked:
    """A todo row-locked until commit, the database's now, and its newest outbox row not yet on Kafka."""

    todo: Todo
    now: datetime
    pending_event: int | None


async def load_for_update(conn: AsyncConnection, todo_id: int) -> Locked | None:
    """The todo, row-locked until commit; None when there is none.

    The row lock makes concurrent commands on one todo run one after another, so its versions never
    skip or repeat and its outbox rows are in version order; the pending row read under it is the one
    this command's event must follow onto Kafka (todo_cqrs/outbox/publisher.py).
    """
    row = (await conn.execute(_LOAD_FOR_UPDATE, {"id": todo_id})).first()
    if row is None:
        return None
    pending = (await conn.execute(_PENDING_EVENT, {"id": todo_id})).scalar()
    return Locked(todo_from_row(row), as_utc(row.now), pending)


async def insert_todo(conn: AsyncConnection, new: NewTodo) -> Todo:
    """Insert a todo at version 1, stamped with the database's clock."""
    values = {"title": new.title, "description": new.description, "status": Status.CREATED.value}
    row = (await conn.execute(_INSERT_TODO, values)).one()
    return new.created(int(row.id), as_utc(row.created_at))


async def save_todo(conn: AsyncConnection, todo: Todo) -> None:
    values = todo_values(todo)
    del values["created_at"]
    await conn.execute(_SAVE_TODO, {**values, "id": todo.id})


async def delete_todo(conn: AsyncConnection, todo_id: int) -> None:
    await conn.execute(_DELETE_TODO, {"id": todo_id})


def shard_of(todo_id: int) -> int:
    return todo_id % settings().outbox_shards


async def append_event(conn: AsyncConnection, event: TodoEvent, trace: TraceContext | None) -> OutboxRecord:
    """Add the event to the outbox in the caller's transaction: it commits with the change or not at all.
    Returns the row as the publisher sends it."""
    payload = event.payload.decode()
    occurred_at = naive_utc(event.time)
    traceparent = trace.traceparent if trace else None
    tracestate = trace.tracestate if trace else None
    result = await conn.execute(
        _INSERT_EVENT,
        {
            "event_id": event.event_id,
            "event_type": event.type,
            "todo_id": event.todo_id,
            "version": event.version,
            "occurred_at": occurred_at,
            "payload": payload,
            "shard": shard_of(event.todo_id),
            "traceparent": traceparent,
            "tracestate": tracestate,
        },
    )
    return OutboxRecord(
        int(result.lastrowid),
        event.event_id,
        event.type,
        event.todo_id,
        occurred_at,
        payload,
        traceparent,
        tracestate,
    )
