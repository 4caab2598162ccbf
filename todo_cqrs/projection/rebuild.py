"""Rebuild the read model from the write model's current state, into a shadow table swapped in
atomically, while commands and the live projection go on. O(todos), not O(history).

1. `todos_view_rebuild` is created empty, like `todos_view`, and two triggers on `todos_view` mirror
   into it every change the live projection makes from then on, through the same version gate. So
   the shadow never misses an event applied to the live table meanwhile, whatever its id and
   whenever its command committed (an AUTO_INCREMENT id is assigned at insert, not at commit, so no
   id-ordered copy or replay can tell when it has seen every commit).
2. The write model's live todos are copied in id order, through the projection's version-gated
   upsert: a row the mirror already brought to a newer version keeps it.
3. Tombstones, which guard against resurrection by a late event: for every deletion the outbox still
   holds (its version and time), and every tombstone of the live table whose id the shadow lacks
   (deletions older than the outbox's retention). A stray live row of the old table is not copied.
4. A catch-up pass (reconciliation in its forward mode: todo_cqrs/reconcile) brings the shadow to the
   write model for whatever changed during the copy and was not projected yet.
5. One `RENAME TABLE` swaps the tables. Every row of the shadow is then at least as new as the live
   table's was (the mirror), so a reader never sees a todo go back in time at the swap. The old table
   and its triggers are dropped, a second catch-up runs on the new table, and cached entries are
   dropped (invalidation markers kept, so nothing older than what was applied can be cached).

DB_TIMEOUT_SECONDS does not apply: the rebuild's statements may take as long as the data needs.
The triggers run as their definer (this admin user), so the projection's own user needs no right on
the shadow. A rebuild that dies leaves the triggers in place until the next one removes them first.

`python -m todo_cqrs.projection.rebuild` (`make rebuild`)
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_cqrs import db
from todo_cqrs.adapters.cache import TodoCache, redis_client
from todo_cqrs.adapters.read_store import TABLE, upsert_statement
from todo_cqrs.domain.todo import Status
from todo_cqrs.reconcile.passes import Reconciler
from todo_cqrs.reconcile.service import batch_engine
from todo_cqrs.settings import Settings, settings

SHADOW = f"{TABLE}_rebuild"
RETIRED = f"{TABLE}_old"
TRIGGERS = (f"{SHADOW}_on_insert", f"{SHADOW}_on_update")
BATCH = 2000
COLUMNS = ("id", "title", "description", "status", "version", "created_at", "updated_at", "deleted")
_SESSION = (
    "SET SESSION max_statement_time = 0, innodb_lock_wait_timeout = 10, tx_isolation = 'READ-COMMITTED'"
)

Progress = Callable[[str], None]


def _engine(url: str) -> AsyncEngine:
    # Each statement its own transaction, no time limit, no gap locks: a batch job beside live traffic.
    return batch_engine(url, _SESSION, max_overflow=0)


def _mirror(table: str) -> str:
    """The trigger body: the live table's new row into `table`, only if newer (the projection's gate)."""
    newer = "VALUES(version) > version"
    kept = ("title", "description", "status", "created_at", "updated_at", "deleted")
    return (
        f"INSERT INTO {table} ({', '.join(COLUMNS)}) VALUES ({', '.join('NEW.' + c for c in COLUMNS)}) "
        "ON DUPLICATE KEY UPDATE "
        + ", ".join(f"{c} = IF({newer}, VALUES({c}), {c})" for c in kept)
        + ", version = GREATEST(version, VALUES(version))"
    )


_LIVE = sa.text(
    "SELECT id, title, description, status, version, created_at, updated_at FROM todos "
    "WHERE id > :after ORDER BY id LIMIT :limit"
)
_DELETIONS = sa.text(
    "SELECT id, todo_id, version, occurred_at FROM outbox "
    "WHERE id > :after AND event_type = 'todo.deleted.v1' ORDER BY id LIMIT :limit"
)
_TOMBSTONES = sa.text(
    f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE deleted = 1 AND id > :after ORDER BY id LIMIT :limit"
)
_IF_ABSENT = sa.text(
    f"INSERT INTO {SHADOW} ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + c for c in COLUMNS)}) "
    "ON DUPLICATE KEY UPDATE id = id"
)


class _Copy:
    def __init__(self, write: AsyncEngine, read: AsyncEngine, progress: Progress) -> None:
        self.write, self.read, self.progress = write, read, progress
        self.started = time.monotonic()

    async def _batches(self, engine: AsyncEngine, query: sa.TextClause, key: str = "id") -> Any:
        after = 0
        while True:
            async with engine.connect() as conn:
                rows = (await conn.execute(query, {"after": after, "limit": BATCH})).all()
            if not rows:
                return
            yield rows
            after = getattr(rows[-1], key)

    async def _into_shadow(self, statement: sa.TextClause, rows: list[dict[str, Any]]) -> None:
        for attempt in range(db.DEADLOCK_RETRIES + 1):
            try:
                async with self.read.connect() as conn:
                    await conn.execute(statement, rows)
                return
            except sa.exc.DBAPIError as exc:  # the mirror trigger took a row lock first: again
                if not db.is_deadlock(exc) or attempt == db.DEADLOCK_RETRIES:
                    raise

    async def live_todos(self, total: int) -> int:
        copied = 0
        async for rows in self._batches(self.write, _LIVE):
            await self._into_shadow(
                upsert_statement(SHADOW), [{**row._asdict(), "deleted": False} for row in rows]
            )
            copied += len(rows)
            elapsed = time.monotonic() - self.started
            rate = copied / elapsed if elapsed > 0 else 0.0
            left = f", about {(total - copied) / rate:.0f} s left" if rate and total > copied else ""
            share = f" ({copied * 100 // total}%)" if total else ""
            self.progress(f"rebuild: {copied:,} / {total:,} todos{share}, {rate:,.0f} todos/s{left}")
        return copied

    async def tombstones(self) -> int:
        count = 0
        async for rows in self._batches(self.write, _DELETIONS):
            await self._into_shadow(
                upsert_statement(SHADOW),
                [
                    {
                        "id": row.todo_id,
                        "title": "",
                        "description": "",
                        "status": Status.CREATED.value,
                        "version": row.version,
                        "created_at": row.occurred_at,
                        "updated_at": row.occurred_at,
                        "deleted": True,
                    }  # fmt: skip
                    for row in rows
                ],
            )
            count += len(rows)
        async for rows in self._batches(self.read, _TOMBSTONES):
            await self._into_shadow(_IF_ABSENT, [row._asdict() for row in rows])
            count += len(rows)
        self.progress(f"rebuild: {count:,} tombstones")
        return count


async def _execute(engine: AsyncEngine, *statements: str) -> None:
    async with engine.connect() as conn:
        for statement in statements:
            await conn.exec_driver_sql(statement)


async def rebuild_read_model(
    s: Settings, progress: Progress = lambda line: print(line, file=sys.stderr)
) -> int:
    """Rebuild the read model of the databases and Redis `s` names; returns the live todos copied."""
    write, read = _engine(s.write_db_url), _engine(s.read_db_url)
    cache = TodoCache(lambda: redis_client(s.redis_url, s.redis_timeout_s), s.cache_ttl_s, s.list_cache_ttl_s)
    copy = _Copy(write, read, progress)
    drop_triggers = [f"DROP TRIGGER IF EXISTS {name}" for name in TRIGGERS]
    try:
        await _execute(
            read,
            *drop_triggers,  # first: a trigger left by a rebuild that died writes into the shadow
            f"DROP TABLE IF EXISTS {SHADOW}, {RETIRED}",
            f"CREATE TABLE {SHADOW} LIKE {TABLE}",
            f"CREATE TRIGGER {TRIGGERS[0]} AFTER INSERT ON {TABLE} FOR EACH ROW {_mirror(SHADOW)}",
            # An upsert that changed nothing fires the update trigger too: only real changes are mirrored.
            f"CREATE TRIGGER {TRIGGERS[1]} AFTER UPDATE ON {TABLE} FOR EACH ROW "
            f"BEGIN IF NEW.version <> OLD.version OR NEW.deleted <> OLD.deleted THEN {_mirror(SHADOW)}; "
            "END IF; END",
        )
        async with write.connect() as conn:
            total = int((await conn.execute(sa.text("SELECT COUNT(*) FROM todos"))).scalar_one())
        copied = await copy.live_todos(total)
        await copy.tombstones()
        caught_up = await Reconciler(
            write, read, None, grace_s=0, table=SHADOW, forward=True, count_metrics=False
        ).run_pass()
        progress(f"rebuild: catch-up applied {len(caught_up.repaired_ids)} changes made during the copy")
        await _execute(read, f"RENAME TABLE {TABLE} TO {RETIRED}, {SHADOW} TO {TABLE}")
        progress(f"rebuild: swapped in after {time.monotonic() - copy.started:.1f} s")
        await _execute(read, f"DROP TABLE {RETIRED}")
        after_swap = await Reconciler(
            write, read, cache, grace_s=0, forward=True, count_metrics=False
        ).run_pass()
        if after_swap.repaired_ids:
            progress(f"rebuild: {len(after_swap.repaired_ids)} more changes applied after the swap")
        await cache.forget_everything()
        return copied
    finally:
        await _execute(read, *drop_triggers)
        await cache.aclose()
        await write.dispose()
        await read.dispose()


if __name__ == "__main__":
    began = time.monotonic()
    count = asyncio.run(rebuild_read_model(settings()))
    print(f"copied {count} todos into the read model in {time.monotonic() - began:.1f} s", file=sys.stderr)
