"""One reconciliation pass: the read model compared with the write model, and repaired to it.

The pass walks the write model's ids in chunks of equal work (CHUNK_ROWS todos), compares each
chunk's digests on both sides, and looks row by row only into the small ranges where they differ
(todo_cqrs/reconcile/ranges.py). In such a range it reads the read rows first, then the write rows,
and classifies each id:

- missing: a live todo the read model lacks (no row, or a tombstone);
- different: held with other fields or another version (higher ones too: the write model is the truth);
- extra: a live read row the write model lacks. A tombstone when the write database has assigned the
  id (with the deletion's version and time when the outbox still holds its event), removed when it has
  not, so that the create that will get that id is not blocked.

A difference younger than the grace period is in flight (the projection is about to apply it), not
drift: it is left alone. Every repair is one statement guarded by what was compared (the read row's
version and checksum, or its absence), so a row the projection changed meanwhile is never overwritten
with an older state; such a row is left for the next pass. After each repair the cache entry is
invalidated as the projection does.

`forward=True` is the rebuild's catch-up: no grace, and only the projection's version-gated upsert
(a row moves only to a newer version), since the live projection writes to the same table.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from prometheus_client import Counter, Gauge
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_cqrs.adapters.read_store import upsert_statement
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.domain.todo import Status
from todo_cqrs.logs import log_event
from todo_cqrs.reconcile.ranges import Digest, IdRange, differing_leaves
from todo_cqrs.reconcile.sides import ROW_CHECKSUM, Deletion, ReadSide, Row, WriteSide

KINDS = ("missing", "different", "extra")
CHUNK_ROWS = 20_000
LEAVES_AT_ONCE = 4  # each holds a connection of both pools (2 + 2 overflow) while it looks

passes_total = Counter("todo_reconcile_passes", "Reconciliation passes completed")
drift_total = Counter(
    "todo_reconcile_drift",
    "Differences between the read and the write model older than the grace period, found by a pass",
    ["kind"],
)
repaired_total = Counter("todo_reconcile_repaired", "Read rows a reconciliation pass repaired")
last_pass_timestamp = Gauge(
    "todo_reconcile_last_pass_timestamp_seconds", "When the last reconciliation pass completed (Unix time)"
)
for _kind in KINDS:
    drift_total.labels(_kind)


class Invalidator(Protocol):
    async def invalidate(self, todo_id: int, version: int, traceparent: str | None = None) -> None: ...


@dataclass
class PassReport:
    """What one pass found and did."""

    todos: int = 0  # live todos of the write model it covered
    ranges: int = 0  # chunks compared by digest
    leaves: int = 0  # small ranges compared row by row
    in_flight: int = 0  # differences younger than the grace period, left alone
    drift: Tally[str] = field(default_factory=Tally)
    repaired: Tally[str] = field(default_factory=Tally)
    changed_meanwhile: int = 0  # drift whose read row changed before its repair: the next pass looks again
    repaired_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "todos": self.todos,
            "ranges": self.ranges,
            "leaves": self.leaves,
            "in_flight": self.in_flight,
            "drift": {kind: self.drift[kind] for kind in KINDS},
            "repaired": {kind: self.repaired[kind] for kind in KINDS},
            "changed_meanwhile": self.changed_meanwhile,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Repair:
    todo_id: int
    kind: str
    statement: sa.TextClause
    params: dict[str, Any]
    read_version: int | None
    write_version: int | None
    new_version: int | None  # None: the row is removed
    invalidate_version: int


class _Statements:
    """The guarded repairs of one table: each changes the row only if it still is what was compared."""

    def __init__(self, table: str) -> None:
        assign = (
            "title = :title, description = :description, status = :status, version = :version, "
            "created_at = :created_at, updated_at = :updated_at"
        )
        seen_live = (
            f"id = :id AND deleted = 0 AND version = :seen_version AND {ROW_CHECKSUM} = :seen_checksum"
        )
        self.insert = sa.text(
            f"INSERT INTO {table} (id, title, description, status, version, created_at, updated_at, deleted) "
            "VALUES (:id, :title, :description, :status, :version, :created_at, :updated_at, 0)"
        )
        self.revive = sa.text(
            f"UPDATE {table} SET {assign}, deleted = 0 "
            "WHERE id = :id AND deleted = 1 AND version = :seen_version"
        )
        self.overwrite = sa.text(f"UPDATE {table} SET {assign} WHERE {seen_live}")
        self.tombstone = sa.text(
            f"UPDATE {table} SET title = '', description = '', status = :status, version = :version, "
            f"created_at = :at, updated_at = :at, deleted = 1 WHERE {seen_live}"
        )
        self.remove = sa.text(f"DELETE FROM {table} WHERE {seen_live}")
        self.upsert = upsert_statement(table)


class Reconciler:
    """Compares the write model with one read table and repairs it. Engines: AUTOCOMMIT, each
    statement its own transaction; `cache`: what the projection invalidates (None: no cache)."""

    def __init__(
        self,
        write: AsyncEngine,
        read: AsyncEngine,
        cache: Invalidator | None,
        *,
        grace_s: float,
        table: str = "todos_view",
        forward: bool = False,
        chunk_rows: int = CHUNK_ROWS,
        count_metrics: bool = True,
    ) -> None:
        self.write, self.read = WriteSide(write), ReadSide(read, table)
        self.read_engine = read
        self.cache = cache
        self.grace = timedelta(seconds=0 if forward else grace_s)
        self.forward = forward
        self.chunk_rows = chunk_rows
        self.count_metrics = count_metrics
        self._sql = _Statements(table)
        self._one_at_a_time = asyncio.Lock()
        # Repairs committed whose cache invalidation failed (Redis down): {todo id: version}, tried
        # again before the next pass, since that pass will find nothing left to repair for them.
        self._not_invalidated: dict[int, int] = {}

    async def run_pass(self) -> PassReport:
        """One pass over every id; passes asked for while one runs wait for it to end."""
        async with self._one_at_a_time:
            report = PassReport()
            started = time.monotonic()
            for todo_id, version in list(self._not_invalidated.items()):
                await self._invalidate(todo_id, version)
            last = max(await self.write.max_id(), await self.read.max_live_id())
            after = 0
            while after < last:
                boundary = await self.write.boundary(after, self.chunk_rows)
                chunk = IdRange(after + 1, last if boundary is None else min(boundary, last))
                write_digest, read_digest = await asyncio.gather(
                    self.write.digests(chunk, chunk.size), self.read.digests(chunk, chunk.size)
                )
                report.ranges += 1
                report.todos += write_digest.get(0, Digest()).count
                await self._compare(
                    chunk, write_digest.get(0, Digest()), read_digest.get(0, Digest()), report
                )
                after = chunk.high
            report.seconds = time.monotonic() - started
            if self.count_metrics:
                passes_total.inc()
                for kind in KINDS:
                    drift_total.labels(kind).inc(report.drift[kind])
                last_pass_timestamp.set(time.time())
            if self._not_invalidated:
                raise DependencyUnavailable(
                    f"redis is unreachable: {len(self._not_invalidated)} repaired todos are still cached "
                    "as they were; the next pass invalidates them"
                )
            return report

    async def _compare(self, chunk: IdRange, write: Digest, read: Digest, report: PassReport) -> None:
        # Small ranges are looked into while the search goes on, a few at a time (they are disjoint).
        slots = asyncio.Semaphore(LEAVES_AT_ONCE)

        async def look_into(leaf: IdRange) -> None:
            try:
                for repair in await self._repairs(leaf, report):
                    await self._apply(repair, report)
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as group:
                async for leaf in differing_leaves(self.write, self.read, chunk, write, read):
                    report.leaves += 1
                    await slots.acquire()
                    group.create_task(look_into(leaf))
        except BaseExceptionGroup as failed:  # the first failure, as the caller maps it (503, ...)
            raise failed.exceptions[0] from None

    async def _repairs(self, leaf: IdRange, report: PassReport) -> list[_Repair]:
        # Checksums first (two integers a row), then the whole rows of the ids that differ. The read
        # side first, each time: whatever the projection applied before a read of the read model, the
        # write rows read next already hold (or a newer state), so a read row ahead is drift, not a race.
        read_sums = await self.read.checksums(leaf)
        write_sums = await self.write.checksums(leaf)
        suspects = sorted(
            todo_id
            for todo_id in read_sums.keys() | write_sums.keys()
            if read_sums.get(todo_id, (None, True)) != (write_sums.get(todo_id), False)
            and (todo_id in write_sums or not read_sums[todo_id][1])
        )
        if not suspects:
            return []
        read_rows = await self.read.rows(suspects)
        write_rows, now = await self.write.rows(suspects)
        extra = [i for i, row in read_rows.items() if not row.deleted and i not in write_rows]
        assigned = await self.write.assigned() if extra else 0
        deletions = await self.write.deletions([i for i in extra if i <= assigned])
        repairs: list[_Repair] = []
        for todo_id in sorted(read_rows.keys() | write_rows.keys()):
            written, held = write_rows.get(todo_id), read_rows.get(todo_id)
            if written is not None:
                if held is not None and not held.deleted and held.checksum == written.checksum:
                    continue
                kind = "missing" if held is None or held.deleted else "different"
                if self._in_flight(now, written.updated_at, report):
                    continue
                repairs.append(self._to_written(kind, written, held))
            elif held is not None and not held.deleted:
                deletion = deletions.get(todo_id)
                if deletion is not None and self._in_flight(now, deletion.at, report):
                    continue
                repair = self._to_deleted(held, deletion, now, assigned)
                if repair is not None:
                    repairs.append(repair)
        return repairs

    def _in_flight(self, now: datetime, changed_at: datetime, report: PassReport) -> bool:
        if now - changed_at < self.grace:
            report.in_flight += 1
            return True
        return False

    def _to_written(self, kind: str, written: Row, held: Row | None) -> _Repair:
        values = written.values()
        seen = held.version if held is not None else None
        if self.forward:
            return _Repair(
                written.id, kind, self._sql.upsert, {**values, "deleted": False}, seen, written.version,
                written.version, written.version,
            )  # fmt: skip
        if held is None:
            statement, params = self._sql.insert, values
        elif held.deleted:
            statement, params = self._sql.revive, {**values, "seen_version": held.version}
        else:
            statement = self._sql.overwrite
            params = {**values, "seen_version": held.version, "seen_checksum": held.checksum}
        return _Repair(
            written.id, kind, statement, params, seen, written.version, written.version,
            _invalidation_version(written.version, seen),
        )  # fmt: skip

    def _to_deleted(
        self, held: Row, deletion: Deletion | None, now: datetime, assigned: int
    ) -> _Repair | None:
        guard = {"id": held.id, "seen_version": held.version, "seen_checksum": held.checksum}
        if self.forward:
            if deletion is None:
                return None  # nothing newer to apply: left to the next (truth-keeping) pass
            params = {
                "id": held.id, "title": "", "description": "", "status": Status.CREATED.value,
                "version": deletion.version, "created_at": deletion.at, "updated_at": deletion.at,
                "deleted": True,
            }  # fmt: skip
            return _Repair(
                held.id,
                "extra",
                self._sql.upsert,
                params,
                held.version,
                None,
                deletion.version,
                deletion.version,
            )
        if held.id > assigned:
            return _Repair(
                held.id, "extra", self._sql.remove, guard, held.version, None, None, held.version + 1
            )
        version = deletion.version if deletion is not None else held.version
        at = deletion.at if deletion is not None else now
        params = {**guard, "status": Status.CREATED.value, "version": version, "at": at}
        return _Repair(
            held.id, "extra", self._sql.tombstone, params, held.version, None, version,
            _invalidation_version(version, held.version),
        )  # fmt: skip

    async def _apply(self, repair: _Repair, report: PassReport) -> None:
        report.drift[repair.kind] += 1
        try:
            async with self.read_engine.connect() as conn:
                changed = (await conn.execute(repair.statement, repair.params)).rowcount > 0
        except IntegrityError:  # the insert of a missing row met the projection's: it got there first
            changed = False
        if not changed:
            if not self.forward:
                report.changed_meanwhile += 1
            return
        report.repaired[repair.kind] += 1
        report.repaired_ids.append(repair.todo_id)
        if self.count_metrics:
            repaired_total.inc()
        log_event(
            "reconcile_repair",
            todo_id=repair.todo_id,
            kind=repair.kind,
            read_version=repair.read_version,
            write_version=repair.write_version,
            new_version=repair.new_version,
            forward=self.forward or None,
        )
        await self._invalidate(repair.todo_id, repair.invalidate_version)

    async def _invalidate(self, todo_id: int, version: int) -> None:
        if self.cache is None:
            return
        try:
            await self.cache.invalidate(todo_id, version)
        except DependencyUnavailable:
            self._not_invalidated[todo_id] = max(version, self._not_invalidated.get(todo_id, 0))
        else:
            self._not_invalidated.pop(todo_id, None)


def _invalidation_version(new: int, seen: int | None) -> int:
    """The version to invalidate the cache for: the new one, or just past the one the read model held
    when the repair takes it back (so a reader that read the bad row cannot cache it afterwards)."""
    return new if seen is None or seen < new else seen + 1
