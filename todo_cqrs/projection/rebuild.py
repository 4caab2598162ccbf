"""Rebuild the read model: empty it and the cache, then replay the write DB's outbox history.

The outbox, not the topic, is replayed: it keeps every committed change (published or still
pending) for as long as the write DB lives, while the topic's retention is bounded. Replaying goes
through the projection's own `apply_change`, so events arriving live meanwhile are harmless: both
paths apply only newer versions.

`python -m todo_cqrs.projection.rebuild`
"""

from __future__ import annotations

import json
import sys
import time

import sqlalchemy as sa

from todo_cqrs.adapters.cache import todo_cache
from todo_cqrs.adapters.read_store import apply_change, read_connection, todos_view
from todo_cqrs.adapters.write_store import as_utc, outbox, write_transaction
from todo_cqrs.domain.events import read_change

BATCH = 1000


def rebuild_read_model() -> int:
    """Returns the number of events replayed."""
    cache = todo_cache()
    with read_connection() as conn:
        conn.execute(sa.delete(todos_view))
    cache.forget_everything()
    replayed, after_id = 0, 0
    while True:
        with write_transaction() as conn:
            rows = conn.execute(
                sa.select(outbox.c.id, outbox.c.event_type, outbox.c.occurred_at, outbox.c.payload)
                .where(outbox.c.id > after_id)
                .order_by(outbox.c.id)
                .limit(BATCH)
            ).all()
        if not rows:
            break
        with read_connection() as conn:
            for row in rows:
                apply_change(
                    conn, read_change(row.event_type, json.loads(row.payload)), as_utc(row.occurred_at)
                )
        replayed += len(rows)
        after_id = rows[-1].id
    # Pages cached while the replay was half-way are retired, like entries read meanwhile.
    cache.forget_everything()
    return replayed


if __name__ == "__main__":
    started = time.monotonic()
    count = rebuild_read_model()
    print(
        f"replayed {count} events into the read model in {time.monotonic() - started:.1f} s", file=sys.stderr
    )
