"""Rebuild the read model from the write DB's outbox history, into a shadow table swapped in atomically.

1. `todos_view_rebuild` is created empty, like `todos_view`, and filled by replaying the outbox in id
   order, through the projection's own version-gated upsert (many rows per statement).
2. Events committed meanwhile are replayed too (catch-up), then one `RENAME TABLE` swaps the tables:
   reads are served from the old table until that instant, from the rebuilt one after it.
3. A last catch-up replays what the live projection applied to the old table just before the swap,
   and the old table is dropped. The cache keeps its invalidation markers, so a reader can never
   store a version older than one the projection applied; cached entries and pages are dropped.

The outbox, not the topic, is replayed: it keeps every committed change (published or still pending)
for as long as the write DB lives, while the topic's retention is bounded. DB_TIMEOUT_SECONDS does
not apply: the rebuild's statements may take as long as the data needs.

`python -m todo_cqrs.projection.rebuild` (`make rebuild`)
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_cqrs import db
from todo_cqrs.adapters.cache import todo_cache
from todo_cqrs.adapters.read_store import TABLE, change_row, upsert_statement
from todo_cqrs.domain.clock import as_utc
from todo_cqrs.domain.events import read_change
from todo_cqrs.settings import settings

SHADOW = f"{TABLE}_rebuild"
RETIRED = f"{TABLE}_old"
BATCH = 5000
_REPLAY = sa.text(
    "SELECT id, event_type, occurred_at, payload FROM outbox WHERE id > :after ORDER BY id LIMIT :limit"
)
_HISTORY = sa.text("SELECT COUNT(*) AS events, COALESCE(MAX(id), 0) AS last FROM outbox")

Progress = Callable[[str], None]


def _engine(url: str) -> AsyncEngine:
    # No session time limits and a long connect bound: this is a batch job, not a request.
    return db.create_engine(
        url,
        isolation_level="READ COMMITTED",
        pool_size=2,
        max_overflow=0,
        connect_args={"connect_timeout": 10},
    )


class Replay:
    def __init__(self, write: AsyncEngine, read: AsyncEngine, table: str, progress: Progress) -> None:
        self.write, self.read, self.table, self.progress = write, read, table, progress
        self.after_id = 0
        self.replayed = 0

    async def run(self, total: int, started: float) -> int:
        """Replay the outbox after `after_id` into the table, batch by batch; returns how many events."""
        count = 0
        while True:
            async with self.write.connect() as conn:
                rows = (await conn.execute(_REPLAY, {"after": self.after_id, "limit": BATCH})).all()
            if not rows:
                return count
            changes = [
                change_row(read_change(row.event_type, orjson.loads(row.payload)), as_utc(row.occurred_at))
                for row in rows
            ]
            async with self.read.begin() as conn:
                await conn.execute(upsert_statement(self.table), changes)
            self.after_id = rows[-1].id
            count += len(rows)
            self.replayed += len(rows)
            elapsed = time.monotonic() - started
            rate = self.replayed / elapsed if elapsed > 0 else 0.0
            left = max(0, total - self.replayed)
            eta = f", about {left / rate:.0f} s left" if rate and left else ""
            share = f" ({self.replayed * 100 // total}%)" if total else ""
            self.progress(f"rebuild: {self.replayed:,} / {total:,} events{share}, {rate:,.0f} events/s{eta}")


async def rebuild_read_model(progress: Progress = lambda line: print(line, file=sys.stderr)) -> int:
    """Returns the number of events replayed."""
    s = settings()
    write, read = _engine(s.write_db_url), _engine(s.read_db_url)
    started = time.monotonic()
    try:
        async with read.begin() as conn:
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {SHADOW}, {RETIRED}"))
            await conn.execute(sa.text(f"CREATE TABLE {SHADOW} LIKE {TABLE}"))
        async with write.connect() as conn:
            history = (await conn.execute(_HISTORY)).one()
        replay = Replay(write, read, SHADOW, progress)
        await replay.run(history.events, started)
        await replay.run(history.events, started)  # what was committed while the first pass ran
        async with read.begin() as conn:
            await conn.execute(sa.text(f"RENAME TABLE {TABLE} TO {RETIRED}, {SHADOW} TO {TABLE}"))
        progress(f"rebuild: swapped in after {time.monotonic() - started:.1f} s")
        replay.table = TABLE
        await replay.run(history.events, started)  # what the live projection put in the old table last
        async with read.begin() as conn:
            await conn.execute(sa.text(f"DROP TABLE {RETIRED}"))
        await todo_cache().forget_everything()
        return replay.replayed
    finally:
        await write.dispose()
        await read.dispose()


if __name__ == "__main__":
    began = time.monotonic()
    count = asyncio.run(rebuild_read_model())
    print(f"replayed {count} events into the read model in {time.monotonic() - began:.1f} s", file=sys.stderr)
