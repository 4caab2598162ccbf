"""The read database: projected todos, with tombstones for deleted ones."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import DATETIME
from sqlalchemy.engine import Connection

from todo_cqrs.adapters.write_store import naive_utc, todo_from_row
from todo_cqrs.db import read_engine, transaction
from todo_cqrs.domain.events import Change
from todo_cqrs.domain.todo import Status, Todo

metadata = sa.MetaData()

todos_view = sa.Table(
    "todos_view",
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

# One statement, safe under concurrent delivery of the same id: the row lock of the upsert
# serialises them, and every column moves only when the incoming version is newer. `version` is
# assigned last because MariaDB evaluates the assignments left to right.
_NEWER = "VALUES(version) > version"
_UPSERT = sa.text(
    "INSERT INTO todos_view (id, title, description, status, version, created_at, updated_at, deleted) "
    "VALUES (:id, :title, :description, :status, :version, :created_at, :updated_at, :deleted) "
    "ON DUPLICATE KEY UPDATE "
    + ", ".join(
        f"{col} = IF({_NEWER}, VALUES({col}), {col})"
        for col in ("title", "description", "status", "created_at", "updated_at", "deleted")
    )
    + ", version = GREATEST(version, VALUES(version))"
)


# Built once, with bound parameters: the statements compile once per process.
_GET_ROW = sa.select(todos_view).where(todos_view.c.id == sa.bindparam("todo_id"))
_PAGE = (
    sa.select(todos_view)
    .where(todos_view.c.deleted == sa.false(), todos_view.c.id > sa.bindparam("after_id"))
    .order_by(todos_view.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer, literal_execute=True))
)
_PAGE_OF_STATUS = _PAGE.where(todos_view.c.status == sa.bindparam("status"))


def read_connection() -> AbstractContextManager[Connection]:
    """A read-DB connection in a transaction; an unreachable database becomes DependencyUnavailable."""
    return transaction(read_engine(), "read")


def apply_change(conn: Connection, change: Change, event_time: Any) -> None:
    """Upsert the todo (or its tombstone) unless the read model already holds this version or a newer one."""
    if change.todo is not None:
        todo = change.todo
        row = {
            "id": todo.id,
            "title": todo.title,
            "description": todo.description,
            "status": todo.status.value,
            "version": todo.version,
            "created_at": naive_utc(todo.created_at),
            "updated_at": naive_utc(todo.updated_at),
            "deleted": False,
        }
    else:
        moment = naive_utc(event_time)
        row = {
            "id": change.todo_id,
            "title": "",
            "description": "",
            "status": Status.CREATED.value,
            "version": change.version,
            "created_at": moment,
            "updated_at": moment,
            "deleted": True,
        }
    conn.execute(_UPSERT, row)


def get_row(conn: Connection, todo_id: int) -> tuple[Todo | None, int | None]:
    """(todo, version): the live todo, or (None, tombstone version), or (None, None) when never seen."""
    row = conn.execute(_GET_ROW, {"todo_id": todo_id}).first()
    if row is None:
        return None, None
    if row.deleted:
        return None, row.version
    return todo_from_row(row), row.version


def list_rows(conn: Connection, status: Status | None, after_id: int, limit: int) -> list[Todo]:
    """Live todos with id > after_id in id order: an index range scan, the same cost at any depth."""
    if status is None:
        rows = conn.execute(_PAGE, {"after_id": after_id, "limit": limit}).all()
    else:
        rows = conn.execute(
            _PAGE_OF_STATUS, {"after_id": after_id, "limit": limit, "status": status.value}
        ).all()
    return [todo_from_row(row) for row in rows]
