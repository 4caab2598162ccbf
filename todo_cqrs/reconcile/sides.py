"""The two sides of a comparison, in SQL: the write model's `todos` and the read model's `todos_view`
(or the rebuild's shadow table). Each computes its digests itself, so a range in sync costs two
aggregate queries and no row leaves either database.

A row's checksum is CRC32 over its fields (lengths in front of the free-text ones, so no two rows
read alike), the same expression on both sides; DATETIME(3) columns print alike in both databases.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_cqrs.reconcile.ranges import Digest, IdRange

ROW_CHECKSUM = (
    "CRC32(CONCAT_WS('|', id, CHAR_LENGTH(title), title, CHAR_LENGTH(description), description, "
    "status, version, created_at, updated_at))"
)
COLUMNS = "id, title, description, status, version, created_at, updated_at"
DELETED_TYPE = "todo.deleted.v1"


@dataclass(frozen=True, slots=True)
class Row:
    """A todo as one side stores it, with its checksum (the read side's tombstones have deleted=True)."""

    id: int
    title: str
    description: str
    status: str
    version: int
    created_at: datetime
    updated_at: datetime
    checksum: int
    deleted: bool = False

    def values(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "status": self.status,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Deletion:
    version: int
    at: datetime


def _row(record: Any, deleted: bool = False) -> Row:
    return Row(
        record.id,
        record.title,
        record.description,
        record.status,
        record.version,
        record.created_at,
        record.updated_at,
        int(record.checksum),
        deleted,
    )


def _digests(result: Any) -> dict[int, Digest]:
    return {
        int(r.part): Digest(int(r.n or 0), int(r.c or 0), int(r.r or 0)) for r in result if (r.r or 0) > 0
    }


class WriteSide:
    """The write model: live todos only (a deletion removes the row; the outbox keeps its event)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._whole = sa.text(
            f"SELECT 0 AS part, COUNT(*) AS n, BIT_XOR({ROW_CHECKSUM}) AS c, COUNT(*) AS r "
            "FROM todos WHERE id BETWEEN :low AND :high"
        )
        self._parts = sa.text(
            f"SELECT (id - :low) DIV :width AS part, COUNT(*) AS n, BIT_XOR({ROW_CHECKSUM}) AS c, "
            "COUNT(*) AS r FROM todos WHERE id BETWEEN :low AND :high GROUP BY part"
        )

    async def digests(self, ids: IdRange, width: int) -> dict[int, Digest]:
        statement = self._whole if width >= ids.size else self._parts
        async with self.engine.connect() as conn:
            result = await conn.execute(statement, {"low": ids.low, "high": ids.high, "width": width})
            return _digests(result)

    async def max_id(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(sa.text("SELECT COALESCE(MAX(id), 0) FROM todos"))).scalar_one())

    async def boundary(self, after: int, rows: int) -> int | None:
        """The id `rows` live todos after `after` (None: fewer are left): chunks of equal work."""
        statement = sa.text("SELECT id FROM todos WHERE id > :after ORDER BY id LIMIT 1 OFFSET :skip")
        async with self.engine.connect() as conn:
            found = (await conn.execute(statement, {"after": after, "skip": rows - 1})).scalar()
        return int(found) if found is not None else None

    async def checksums(self, ids: IdRange) -> dict[int, int]:
        """{id: row checksum} of the live todos in the range: the cheap first look into a range."""
        async with self.engine.connect() as conn:
            statement = sa.text(f"SELECT id, {ROW_CHECKSUM} FROM todos WHERE id BETWEEN :low AND :high")
            return {
                int(i): int(c) for i, c in await conn.execute(statement, {"low": ids.low, "high": ids.high})
            }

    async def rows(self, todo_ids: list[int]) -> tuple[dict[int, Row], datetime]:
        """(these live todos, the database's now just after reading them)."""
        statement = sa.text(
            f"SELECT {COLUMNS}, {ROW_CHECKSUM} AS checksum FROM todos WHERE id IN :ids"
        ).bindparams(sa.bindparam("ids", expanding=True))
        async with self.engine.connect() as conn:
            rows = {r.id: _row(r) for r in await conn.execute(statement, {"ids": todo_ids})}
            now = (await conn.execute(sa.text("SELECT UTC_TIMESTAMP(3)"))).scalar_one()
        return rows, now

    async def assigned(self) -> int:
        """The highest id the database has handed out, committed or not (AUTO_INCREMENT; MAX(id)
        covers a server that reports it late)."""
        async with self.engine.connect() as conn:
            statement = sa.text(
                "SELECT GREATEST(COALESCE((SELECT AUTO_INCREMENT - 1 FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'todos'), 0), "
                "COALESCE((SELECT MAX(id) FROM todos), 0))"
            )
            return int((await conn.execute(statement)).scalar_one())

    async def deletions(self, todo_ids: list[int]) -> dict[int, Deletion]:
        """The deletion events the outbox still holds for these ids (its index by todo)."""
        if not todo_ids:
            return {}
        statement = sa.text(
            "SELECT todo_id, MAX(version) AS version, MAX(occurred_at) AS at FROM outbox "
            "WHERE todo_id IN :ids AND event_type = :type GROUP BY todo_id"
        ).bindparams(sa.bindparam("ids", expanding=True))
        async with self.engine.connect() as conn:
            result = await conn.execute(statement, {"ids": todo_ids, "type": DELETED_TYPE})
            return {int(r.todo_id): Deletion(int(r.version), r.at) for r in result}


class ReadSide:
    """The read model's table: live rows are compared, tombstones only counted (they are sized into
    the row-by-row look, and matter when a live todo has one)."""

    def __init__(self, engine: AsyncEngine, table: str) -> None:
        self.engine, self.table = engine, table
        live_crc = f"BIT_XOR(IF(deleted = 0, {ROW_CHECKSUM}, 0))"
        self._whole = sa.text(
            f"SELECT 0 AS part, SUM(deleted = 0) AS n, {live_crc} AS c, COUNT(*) AS r "
            f"FROM {table} WHERE id BETWEEN :low AND :high"
        )
        self._parts = sa.text(
            f"SELECT (id - :low) DIV :width AS part, SUM(deleted = 0) AS n, {live_crc} AS c, COUNT(*) AS r "
            f"FROM {table} WHERE id BETWEEN :low AND :high GROUP BY part"
        )

    async def digests(self, ids: IdRange, width: int) -> dict[int, Digest]:
        statement = self._whole if width >= ids.size else self._parts
        async with self.engine.connect() as conn:
            result = await conn.execute(statement, {"low": ids.low, "high": ids.high, "width": width})
            return _digests(result)

    async def max_live_id(self) -> int:
        async with self.engine.connect() as conn:
            statement = sa.text(f"SELECT COALESCE(MAX(id), 0) FROM {self.table} WHERE deleted = 0")
            return int((await conn.execute(statement)).scalar_one())

    async def checksums(self, ids: IdRange) -> dict[int, tuple[int, bool]]:
        """{id: (row checksum, deleted)} of every row in the range, tombstones included."""
        statement = sa.text(
            f"SELECT id, {ROW_CHECKSUM}, deleted FROM {self.table} WHERE id BETWEEN :low AND :high"
        )
        async with self.engine.connect() as conn:
            result = await conn.execute(statement, {"low": ids.low, "high": ids.high})
            return {int(i): (int(c), bool(d)) for i, c, d in result}

    async def rows(self, todo_ids: list[int]) -> dict[int, Row]:
        """These rows, tombstones included."""
        statement = sa.text(
            f"SELECT {COLUMNS}, deleted, {ROW_CHECKSUM} AS checksum FROM {self.table} WHERE id IN :ids"
        ).bindparams(sa.bindparam("ids", expanding=True))
        async with self.engine.connect() as conn:
            return {r.id: _row(r, bool(r.deleted)) for r in await conn.execute(statement, {"ids": todo_ids})}
