"""The read database: projected todos, with tombstones for deleted ones (`ReadStore`)."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import DATETIME
from sqlalchemy.ext.asyncio import AsyncConnection

from todo_cqrs.adapters.rows import todo_from_row
from todo_cqrs.db import Database, Statements
from todo_cqrs.domain.clock import naive_utc
from todo_cqrs.domain.events import Change
from todo_cqrs.domain.todo import Status, Todo

TABLE = "todos_view"
metadata = sa.MetaData()

todos_view = sa.Table(
    TABLE,
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("title", sa.String(255), nullable=False),
    sa.Column("description", sa.String(2000), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", DATETIME(fsp=3), nullable=False),
    sa.Column("updated_at", DATETIME(fsp=3), nullable=False),
    # A tombstone keeps the deletion's version, so an older event cannot bring the todo back.
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    # Keyset pages: live todos in id order, with or without a status filter.
    sa.Index("ix_todos_view_live_id", "deleted", "id"),
    sa.Index("ix_todos_view_live_status_id", "deleted", "status", "id"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
)


def _upsert(table: str, param: str) -> str:
    """One statement, safe under concurrent delivery of the same id: the row lock of the upsert
    serialises them, and every column moves only when the incoming version is newer. `version` is
    assigned last because MariaDB evaluates the assignments left to right. Affected rows: 1 inserted,
    2 updated, 0 nothing to do (a duplicate or an older version). `param` formats a parameter."""
    newer = "VALUES(version) > version"
    columns = ("title", "description", "status", "created_at", "updated_at", "deleted")
    names = ("id", "title", "description", "status", "version", "created_at", "updated_at", "deleted")
    return (
        f"INSERT INTO {table} ({', '.join(names)}) "
        f"VALUES ({', '.join(param.format(name) for name in names)}) "
        "ON DUPLICATE KEY UPDATE "
        + ", ".join(f"{col} = IF({newer}, VALUES({col}), {col})" for col in columns)
        + ", version = GREATEST(version, VALUES(version))"
    )


@cache
def upsert_statement(table: str = TABLE) -> sa.TextClause:
    """The upsert for SQLAlchemy (the rebuild, reconciliation's repairs)."""
    return sa.text(_upsert(table, ":{}"))


# The projection's and the reads' hot statements, as SQL text for the driver (see db.Statements).
_UPSERT = _upsert(TABLE, "%({})s")
_GET = (
    f"SELECT id, title, description, status, version, created_at, updated_at, deleted FROM {TABLE} "
    "WHERE id = %s"
)


# Built once, with bound parameters: the statements compile once per process.
_PAGE = (
    sa.select(todos_view)
    .where(todos_view.c.deleted == sa.false(), todos_view.c.id > sa.bindparam("after_id"))
    .order_by(todos_view.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer, literal_execute=True))
)
_PAGE_OF_STATUS = _PAGE.where(todos_view.c.status == sa.bindparam("status"))


def change_row(change: Change, event_time: datetime) -> dict[str, Any]:
    """The row the change leaves: the todo, or a tombstone stamped with the event's time."""
    if change.todo is not None:
        todo = change.todo
        return {
            "id": todo.id,
            "title": todo.title,
            "description": todo.description,
            "status": todo.status.value,
            "version": todo.version,
            "created_at": naive_utc(todo.created_at),
            "updated_at": naive_utc(todo.updated_at),
            "deleted": False,
        }
    moment = naive_utc(event_time)
    return {
        "id": change.todo_id,
        "title": "",
        "description": "",
        "status": Status.CREATED.value,
        "version": change.version,
        "created_at": moment,
        "updated_at": moment,
        "deleted": True,
    }


async def apply_change(db: Statements, change: Change, event_time: datetime) -> bool:
    """Upsert the todo (or its tombstone) unless the read model already holds this version or a newer
    one; True when it changed the read model."""
    cursor = await db.execute(_UPSERT, change_row(change, event_time))
    return bool(cursor.rowcount > 0)


async def apply_changes(db: Statements, changes: list[tuple[Change, datetime]]) -> list[bool]:
    """Upsert many changes in one statement, each row version-gated as `apply_change` does, in list
    order; per change, whether it was newer than what the read model held before it. (Read just before
    the upsert: another writer of the same id in between would make a flag wrong, never a row.)"""
    ids = sorted({change.todo_id for change, _ in changes})
    marks = ", ".join(["%s"] * len(ids))
    cursor = await db.execute(f"SELECT id, version FROM {TABLE} WHERE id IN ({marks})", ids)
    held = dict(await cursor.fetchall())
    applied = []
    for change, _ in changes:
        newer = change.version > held.get(change.todo_id, 0)
        if newer:
            held[change.todo_id] = change.version
        applied.append(newer)
    # The driver sends the parameter sets as one multi-row INSERT ... ON DUPLICATE KEY UPDATE.
    await db.execute_many(_UPSERT, [change_row(change, moment) for change, moment in changes])
    return applied


async def get_row(db: Statements, todo_id: int) -> tuple[Todo | None, int | None]:
    """(todo, version): the live todo, or (None, tombstone version), or (None, None) when never seen."""
    row = await db.one(_GET, (todo_id,))
    if row is None:
        return None, None
    version, deleted = row[4], row[7]
    return (None if deleted else todo_from_row(row)), version


async def list_rows(conn: AsyncConnection, status: Status | None, after_id: int, limit: int) -> list[Todo]:
    """Live todos with id > after_id in id order: an index range scan, the same cost at any depth."""
    if status is None:
        result = await conn.execute(_PAGE, {"after_id": after_id, "limit": limit})
    else:
        result = await conn.execute(
            _PAGE_OF_STATUS, {"after_id": after_id, "limit": limit, "status": status.value}
        )
    return [todo_from_row(row) for row in result.all()]


class ReadStore:
    """The read model in the read database: each call one autocommitted statement under the database's
    deadline; an unreachable database raises DependencyUnavailable. tests/contract holds the in-memory
    fake to this class's behaviour."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def get(self, todo_id: int) -> tuple[Todo | None, int | None]:
        """(todo, version): the live todo, or (None, tombstone version), or (None, None) when never seen."""
        async with self.database.autocommitted_statements() as db:
            return await get_row(db, todo_id)

    async def page(self, status: Status | None, after_id: int, limit: int) -> list[Todo]:
        """Live todos with id > after_id in id order, at most `limit`."""
        async with self.database.autocommitted() as conn:
            return await list_rows(conn, status, after_id, limit)

    async def apply(self, change: Change, event_time: datetime) -> bool:
        """The change unless the read model holds its version or a newer one; True when it changed it."""
        async with self.database.autocommitted_statements() as db:
            return await apply_change(db, change, event_time)

    async def apply_all(self, changes: list[tuple[Change, datetime]]) -> list[bool]:
        """Many changes in one statement, each version-gated as `apply` does, in list order."""
        async with self.database.autocommitted_statements() as db:
            return await apply_changes(db, changes)

    async def aclose(self) -> None:
        await self.database.aclose()
