"""The write database: the todos table, the transactional outbox beside it, the outbox's shard leases and
the commands' idempotency keys; `WriteStore` runs a command's unit of work on it.

Every moment of a change (`created_at`, `updated_at`, the event's time) is the database's
`UTC_TIMESTAMP(3)`, read inside the change's transaction: pods with skewed clocks cannot make a todo
go back in time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import orjson
import pymysql
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import DATETIME, MEDIUMTEXT

from todo_cqrs import db
from todo_cqrs.adapters.publisher import OutboxRecord
from todo_cqrs.adapters.rows import todo_from_row
from todo_cqrs.command.idempotency import IdempotencyKey, in_flight, reused
from todo_cqrs.command.unit_of_work import Locked, Outcome, Stored, ToPublish
from todo_cqrs.domain.clock import as_utc, naive_utc
from todo_cqrs.domain.events import TodoEvent
from todo_cqrs.domain.todo import NewTodo, Status, Todo
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
    # What the first request came to (todo_cqrs/command/unit_of_work.Outcome) and its todo as JSON,
    # NULL while it runs: a repeat is answered from them exactly as the first time.
    sa.Column("outcome", sa.SmallInteger, nullable=True),
    sa.Column("todo", MEDIUMTEXT, nullable=True),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("expires_at", Millis, nullable=False),
    sa.Index("ix_idempotency_keys_expires", "expires_at"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
)

# The hot statements, as SQL text for the driver (pyformat parameters): see db.Statements.
_INSERT_TODO = (
    "INSERT INTO todos (title, description, status, version, created_at, updated_at) "
    "VALUES (%(title)s, %(description)s, %(status)s, 1, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3)) "
    "RETURNING id, created_at"
)
_LOAD_FOR_UPDATE = (
    "SELECT id, title, description, status, version, created_at, updated_at, UTC_TIMESTAMP(3) "
    "FROM todos WHERE id = %s FOR UPDATE"
)
# Its own statement, run once the row lock is held (the locking SELECT goes ahead of it in the same round
# trip): a subquery of the locking SELECT would read the outbox as it was when that statement began,
# before the command it waited for had committed its row.
_PENDING_EVENT = "SELECT MAX(id) FROM outbox WHERE todo_id = %s AND published_at IS NULL"
_SAVE_TODO = (
    "UPDATE todos SET title = %(title)s, description = %(description)s, status = %(status)s, "
    "version = %(version)s, updated_at = %(updated_at)s WHERE id = %(id)s"
)
_DELETE_TODO = "DELETE FROM todos WHERE id = %s"
_INSERT_EVENT = (
    "INSERT INTO outbox (event_id, event_type, todo_id, version, occurred_at, payload, shard, traceparent, "
    "tracestate) VALUES (%(event_id)s, %(event_type)s, %(todo_id)s, %(version)s, %(occurred_at)s, "
    "%(payload)s, %(shard)s, %(traceparent)s, %(tracestate)s)"
)

# The key's row, taken without waiting: a row another transaction holds means that request is in flight.
_CLAIM_KEY = (
    "SET STATEMENT innodb_lock_wait_timeout = 0 FOR "
    "INSERT INTO idempotency_keys (key_hash, fingerprint, created_at, expires_at) "
    "VALUES (%(key_hash)s, %(fingerprint)s, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3) + INTERVAL %(ttl)s SECOND)"
)
_STORED_KEY = (
    "SELECT fingerprint, outcome, todo, expires_at > UTC_TIMESTAMP(3) "
    "FROM idempotency_keys WHERE key_hash = %s FOR UPDATE NOWAIT"
)
_RENEW_KEY = (
    "UPDATE idempotency_keys SET fingerprint = %(fingerprint)s, outcome = NULL, todo = NULL, "
    "created_at = UTC_TIMESTAMP(3), expires_at = UTC_TIMESTAMP(3) + INTERVAL %(ttl)s SECOND "
    "WHERE key_hash = %(key_hash)s"
)
_KEEP_OUTCOME = (
    "UPDATE idempotency_keys SET outcome = %(outcome)s, todo = %(todo)s WHERE key_hash = %(key_hash)s"
)
_PURGE_BATCH = 1000
_PURGE_KEYS = sa.text(
    f"DELETE FROM idempotency_keys WHERE expires_at < UTC_TIMESTAMP(3) LIMIT {_PURGE_BATCH}"
)
_DUPLICATE_KEY = 1062
_LOCK_WAIT_TIMEOUT = 1205


def todo_values(todo: Todo) -> dict[str, Any]:
    return {
        "title": todo.title,
        "description": todo.description,
        "status": todo.status.value,
        "version": todo.version,
        "created_at": naive_utc(todo.created_at),
        "updated_at": naive_utc(todo.updated_at),
    }


def shard_of(todo_id: int, shards: int) -> int:
    """todo_id modulo OUTBOX_SHARDS: one todo's outbox rows are in one shard."""
    return todo_id % shards


class MariaDbUnitOfWork:
    """One command's write transaction on MariaDB (todo_cqrs/command/unit_of_work.UnitOfWork)."""

    def __init__(self, statements: db.Statements, shards: int, key_ttl_s: int) -> None:
        self._db = statements
        self._shards = shards
        self._key_ttl_s = key_ttl_s
        self._events: list[tuple[TodoEvent, int | None]] = []
        self._pending: dict[int, int | None] = {}
        self._appended: list[tuple[db.Deferred, Callable[[int], OutboxRecord], int | None]] = []

    async def claim(self, key: IdempotencyKey) -> Stored | None:
        params = {"key_hash": key.key_hash, "fingerprint": key.fingerprint, "ttl": self._key_ttl_s}
        try:
            await self._db.execute(_CLAIM_KEY, params)
            return None
        except pymysql.err.IntegrityError as exc:
            if db.error_code(exc) != _DUPLICATE_KEY:
                raise  # the key was used before (and committed): look at what it came to
        except pymysql.err.OperationalError as exc:
            if db.error_code(exc) == _LOCK_WAIT_TIMEOUT:
                raise in_flight() from exc
            raise
        try:
            fingerprint, outcome, todo, live = await self._db.one(_STORED_KEY, (key.key_hash,))
        except pymysql.err.OperationalError as exc:
            if db.error_code(exc) in db.LOCK_BUSY_CODES:
                raise in_flight() from exc
            raise
        if not live:  # expired: the key is free again
            await self._db.execute(_RENEW_KEY, params)
            return None
        if fingerprint != key.fingerprint:
            raise reused()
        if outcome is None:
            raise in_flight()
        return Stored(Outcome(outcome), Todo.from_dict(orjson.loads(todo)))

    async def keep(self, key: IdempotencyKey, outcome: Outcome, todo: Todo) -> None:
        params = {
            "key_hash": key.key_hash,
            "outcome": outcome.value,
            "todo": orjson.dumps(todo.to_dict()).decode(),
        }
        self._db.defer(_KEEP_OUTCOME, params)

    async def insert(self, new: NewTodo) -> Todo:
        values = {"title": new.title, "description": new.description, "status": Status.CREATED.value}
        todo_id, created_at = await self._db.one(_INSERT_TODO, values)
        return new.created(int(todo_id), as_utc(created_at))

    async def lock(self, todo_id: int) -> Locked | None:
        locked = self._db.defer(_LOAD_FOR_UPDATE, (todo_id,))
        (pending,) = await self._db.one(_PENDING_EVENT, (todo_id,))
        if not locked.rows:
            return None
        self._pending[todo_id] = pending
        row = locked.rows[0]
        return Locked(todo_from_row(row), as_utc(row[7]))

    async def save(self, todo: Todo) -> None:
        values = todo_values(todo)
        del values["created_at"]
        self._db.defer(_SAVE_TODO, {**values, "id": todo.id})

    async def delete(self, todo_id: int) -> None:
        self._db.defer(_DELETE_TODO, (todo_id,))

    def add_event(self, event: TodoEvent) -> None:
        self._events.append((event, self._pending.get(event.todo_id)))

    def append_events(self, trace: TraceContext | None) -> None:
        """The collected events into the outbox, in the transaction (sent with its COMMIT): they commit
        with the change or not at all."""
        traceparent = trace.traceparent if trace else None
        tracestate = trace.tracestate if trace else None
        for event, after in self._events:
            payload = event.payload.decode()
            occurred_at = naive_utc(event.time)
            values = {
                "event_id": event.event_id,
                "event_type": event.type,
                "todo_id": event.todo_id,
                "version": event.version,
                "occurred_at": occurred_at,
                "payload": payload,
                "shard": shard_of(event.todo_id, self._shards),
                "traceparent": traceparent,
                "tracestate": tracestate,
            }
            inserted = self._db.defer(_INSERT_EVENT, values)
            record = partial(
                OutboxRecord,
                event_id=event.event_id,
                event_type=event.type,
                todo_id=event.todo_id,
                occurred_at=occurred_at,
                payload=payload,
                traceparent=traceparent,
                tracestate=tracestate,
            )
            self._appended.append((inserted, record, after))

    def appended(self) -> list[ToPublish]:
        """Once committed: each appended event as the publisher sends it (its outbox row's id now
        known), with the pending row it must follow."""
        published = []
        for inserted, record, after in self._appended:
            assert inserted.lastrowid, "an outbox row's id is known once its COMMIT was read"
            published.append(ToPublish(record(inserted.lastrowid), after))
        return published


class WriteStore:
    """The write database as the commands use it: a unit of work per command, in one transaction, again
    on a deadlock (its effects were rolled back); 503 when the database is unreachable."""

    def __init__(self, database: db.Database, shards: int, key_ttl_s: int) -> None:
        self.database = database
        self._shards = shards
        self._key_ttl_s = key_ttl_s

    async def run(
        self, work: Callable[[MariaDbUnitOfWork], Awaitable[T]], trace: TraceContext | None
    ) -> tuple[T, list[ToPublish]]:
        async def attempt(statements: db.Statements) -> tuple[T, MariaDbUnitOfWork]:
            uow = MariaDbUnitOfWork(statements, self._shards, self._key_ttl_s)
            result = await work(uow)
            uow.append_events(trace)
            return result, uow

        result, committed = await self.database.run_statements(attempt)
        return result, committed.appended()

    async def purge_expired_keys(self, budget_s: float = 2.0) -> int:
        """Delete expired idempotency keys batch after batch, until one comes back short or the time
        budget is spent; returns how many. A batch takes a few milliseconds, so a tick keeps up with any
        command rate the write DB can take (a minute of 250 keyed commands a second is 15 batches)."""
        deadline = time.monotonic() + budget_s
        deleted = 0
        while True:
            async with self.database.transaction() as conn:
                count = (await conn.execute(_PURGE_KEYS)).rowcount
            deleted += count
            if count < _PURGE_BATCH or time.monotonic() >= deadline:
                return deleted

    async def aclose(self) -> None:
        await self.database.aclose()
