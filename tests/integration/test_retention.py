"""Bounded growth, on the real write DB: expired Idempotency-Keys are purged batch after batch until
none is left, and published outbox rows past their retention are pruned, nothing else."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from tests.integration.databases import write_db as write_database
from tests.integration.settings_override import Run
from todo_cqrs.adapters.write_store import WriteStore
from todo_cqrs.reconcile.retention import prune_published_outbox
from todo_cqrs.reconcile.service import batch_engine
from todo_cqrs.settings import settings
from tools.sync_db import write_db

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]


def test_expired_keys_are_purged_in_batches_until_none_is_left_and_live_keys_stay(run: Run[Any]) -> None:
    tag = uuid.uuid4().hex[:16]
    with write_db().begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO idempotency_keys (key_hash, fingerprint, created_at, expires_at) "
                "SELECT SHA2(CONCAT(:tag, seq), 256), 'f', UTC_TIMESTAMP(3) - INTERVAL 2 DAY, "
                "UTC_TIMESTAMP(3) - INTERVAL 1 DAY FROM seq_1_to_2500"
            ),
            {"tag": tag},
        )
        live = sa.text(
            "INSERT INTO idempotency_keys (key_hash, fingerprint, created_at, expires_at) "
            "VALUES (SHA2(:key, 256), 'f', UTC_TIMESTAMP(3), UTC_TIMESTAMP(3) + INTERVAL 1 DAY)"
        )
        conn.execute(live, {"key": f"{tag}-live"})

    s = settings()
    deleted = run(WriteStore(write_database(), s.outbox_shards, s.idempotency_ttl_s).purge_expired_keys())

    assert deleted >= 2500  # more than two batches of 1,000 in one tick
    with write_db().connect() as conn:
        expired = conn.execute(
            sa.text("SELECT COUNT(*) FROM idempotency_keys WHERE expires_at < UTC_TIMESTAMP(3)")
        ).scalar_one()
        kept = conn.execute(
            sa.text("SELECT COUNT(*) FROM idempotency_keys WHERE key_hash = SHA2(:key, 256)"),
            {"key": f"{tag}-live"},
        ).scalar_one()
    assert (expired, kept) == (0, 1)


def test_published_outbox_rows_past_the_retention_are_pruned_and_pending_or_recent_ones_stay(
    run: Run[Any],
) -> None:
    rows = {"old": "INTERVAL 200 HOUR", "recent": "INTERVAL 1 HOUR", "pending": None}
    event_ids = {name: str(uuid.uuid4()) for name in rows}
    with write_db().begin() as conn:
        for name, age in rows.items():
            published = "NULL" if age is None else f"UTC_TIMESTAMP(3) - {age}"
            conn.execute(
                sa.text(
                    "INSERT INTO outbox (event_id, event_type, todo_id, version, occurred_at, payload, "
                    f"published_at, shard) VALUES (:event_id, 'todo.updated.v1', :todo_id, 1, "
                    f"UTC_TIMESTAMP(3) - INTERVAL 300 HOUR, '{{}}', {published}, 0)"
                ),
                {"event_id": event_ids[name], "todo_id": 3 * 10**12},  # an id no todo has
            )

    async def prune() -> int:
        engine = batch_engine(settings().write_db_url)
        try:
            return await prune_published_outbox(engine, retention_h=168, batch=2)
        finally:
            await engine.dispose()

    pruned = run(prune())

    with write_db().begin() as conn:
        left = set(
            conn.execute(
                sa.text("SELECT event_id FROM outbox WHERE event_id IN :ids").bindparams(
                    sa.bindparam("ids", expanding=True)
                ),
                {"ids": list(event_ids.values())},
            ).scalars()
        )
        conn.execute(  # the pending row would otherwise be published by the next relay
            sa.text("DELETE FROM outbox WHERE event_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": list(event_ids.values())},
        )
    assert pruned >= 1
    assert left == {event_ids["recent"], event_ids["pending"]}
