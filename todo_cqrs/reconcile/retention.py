"""Bounded growth of the outbox: published rows older than OUTBOX_RETENTION_HOURS are deleted.

Nothing replays the outbox any more (the rebuild copies the write model's current state), so a
published row only serves the outbox's own idempotence (its `event_id`) and the reconciliation's
knowledge of recent deletions (their version and time), both needed for a few minutes, not a week.
Deleted in batches (the `published_at` index), within a time budget, so a large backlog is worked
off over a few ticks without holding the write DB for long.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

BATCH = 5000
BUDGET_S = 2.0
_PRUNE = sa.text(
    "DELETE FROM outbox WHERE published_at < UTC_TIMESTAMP(3) - INTERVAL :seconds SECOND LIMIT :batch"
)


async def prune_published_outbox(
    engine: AsyncEngine, retention_h: float, *, batch: int = BATCH, budget_s: float = BUDGET_S
) -> int:
    """Delete published outbox rows older than the retention, batch after batch until one comes back
    short or the budget is spent; returns how many. `engine`: AUTOCOMMIT (each batch commits)."""
    deadline = time.monotonic() + budget_s
    deleted = 0
    params = {"seconds": int(retention_h * 3600), "batch": batch}
    while True:
        async with engine.connect() as conn:
            count = (await conn.execute(_PRUNE, params)).rowcount
        deleted += count
        if count < batch or time.monotonic() >= deadline:
            return deleted
