"""The relay: publishes orphaned outbox rows, oldest first per shard, under the shard's lease.

A row is its committing process's to publish for DIRECT_WINDOW_S (see publisher.py); one still
pending OUTBOX_ORPHAN_SECONDS (10 s) after its commit is an orphan (its process crashed or froze, or Kafka
failed it). The relay's tick (a PingSource in a cluster, the runner locally) publishes orphans. One
todo's rows are in one shard, and a shard is drained by the holder of its lease in outbox-id order,
which is version order (the todo's row lock orders its commands).

Fencing: a holder marks rows published only while its lease is still its own, and sends a batch to
Kafka only when its lease has at least 2 x PUBLISH_TIMEOUT_SECONDS + 1 s left (the longest a batch
waits for Kafka). A crash between Kafka's ack and the mark publishes the row again later: delivery is
at least once. The one reordering window left is a process frozen after handing a row to its Kafka
client and resumed after the row became an orphan (bounded by the producer's message timeout, which
is shorter than that; docs/outbox.md).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa
from prometheus_client import Gauge

from todo_cqrs.adapters.publisher import Kafka, OutboxRecord, Publisher
from todo_cqrs.db import Database
from todo_cqrs.logs import log_event
from todo_cqrs.outbox.leases import Lease, acquire, execute, outbox_database, release, renew
from todo_cqrs.outbox.metrics import outbox_publish_failures, outbox_published
from todo_cqrs.settings import Settings

if TYPE_CHECKING:
    from todo_cqrs.http import SenderCheck

LEASE_MARGIN_S = 1.0
GAUGE_REFRESH_S = 5.0
_COLUMNS = "id, event_id, event_type, todo_id, occurred_at, payload, traceparent, tracestate"
_PENDING = sa.text(
    f"SELECT {_COLUMNS} FROM outbox WHERE shard = :shard AND published_at IS NULL "
    "AND occurred_at <= UTC_TIMESTAMP(3) - INTERVAL :min_age_us MICROSECOND ORDER BY id LIMIT :limit"
)
_PENDING_SHARDS = sa.text(
    "SELECT DISTINCT shard FROM outbox WHERE published_at IS NULL "
    "AND occurred_at <= UTC_TIMESTAMP(3) - INTERVAL :min_age_us MICROSECOND"
)
_MARK_FENCED = sa.text(
    "UPDATE outbox SET published_at = UTC_TIMESTAMP(3) "
    "WHERE id IN :ids AND published_at IS NULL AND EXISTS ("
    "SELECT 1 FROM outbox_leases WHERE shard = :shard AND holder = :holder AND expires_at > UTC_TIMESTAMP(3))"
).bindparams(sa.bindparam("ids", expanding=True))
_GAUGES = sa.text(
    "SELECT COUNT(*) AS pending, (SELECT TIMESTAMPDIFF(MICROSECOND, o.occurred_at, UTC_TIMESTAMP(3)) "
    "FROM outbox o WHERE o.published_at IS NULL ORDER BY o.id LIMIT 1) AS oldest_us "
    "FROM outbox WHERE published_at IS NULL"
)

outbox_pending = Gauge(
    "todo_outbox_pending_rows", "Outbox rows not yet on Kafka (refreshed at most every 5 s)"
)
outbox_oldest_age = Gauge(
    "todo_outbox_oldest_pending_age_seconds", "Age of the oldest outbox row not yet on Kafka (0: none)"
)


def record_of(row: Any) -> OutboxRecord:
    return OutboxRecord(
        row.id,
        row.event_id,
        row.event_type,
        row.todo_id,
        row.occurred_at,
        row.payload,
        row.traceparent,
        row.tracestate,
    )


@dataclass
class Drain:
    published: int = 0
    complete: bool = True  # False: rows may still be pending (Kafka failed, or the lease was lost)


@dataclass
class Relay:
    """Drains shards of their orphans: rows pending at least `min_age_s` (0: every pending row)."""

    database: Database
    kafka: Callable[[], Publisher]
    settings: Settings
    min_age_s: float

    async def drain_leased(self, lease: Lease) -> Drain:
        """Publish the shard's orphans, batch after batch, while the lease holds."""
        s = self.settings
        outcome = Drain()
        while True:
            if lease.remaining() < 2 * s.publish_timeout_s + LEASE_MARGIN_S and not await renew(
                self.database, lease
            ):
                outcome.complete = False
                return outcome
            params = {
                "shard": lease.shard,
                "limit": s.relay_batch_size,
                "min_age_us": int(self.min_age_s * 1e6),
            }
            records = [record_of(r) for r in (await execute(self.database, _PENDING, params)).all()]
            if not records:
                return outcome
            delivered = await asyncio.to_thread(self.kafka().publish, records, s.publish_timeout_s)
            if delivered:
                marked = await self.mark_published(lease, delivered)
                outcome.published += marked
                outbox_published.inc(marked)
                if marked < len(delivered):  # fenced off: another holder has the shard now
                    outcome.complete = False
                    return outcome
            if len(delivered) < len(records):
                outbox_publish_failures.inc()
                outcome.complete = False
                return outcome
            if len(records) < s.relay_batch_size:
                return outcome

    async def mark_published(self, lease: Lease, outbox_ids: list[int]) -> int:
        params = {"ids": outbox_ids, "shard": lease.shard, "holder": lease.holder}
        return (await execute(self.database, _MARK_FENCED, params)).rowcount

    async def drain_shard(self, shard: int, wait_s: float = 0.0) -> Drain | None:
        """Take the shard's lease (waiting up to wait_s while another process holds it) and drain it;
        None when the lease stayed busy."""
        deadline = time.monotonic() + wait_s
        while (lease := await acquire(self.database, shard, self.settings.outbox_lease_s)) is None:
            if time.monotonic() + 0.05 > deadline:
                return None
            await asyncio.sleep(0.05)
        try:
            return await self.drain_leased(lease)
        finally:
            await release(self.database, lease)

    async def aclose(self) -> None:
        """Close this loop's pool, and the producer when it is a `Kafka` of its own."""
        await self.database.aclose()
        if isinstance(self.kafka, Kafka):
            self.kafka.close()

    async def drain_all(self, wait_s: float = 0.0) -> int:
        """Drain every shard that has orphans; returns how many rows were published."""
        params = {"min_age_us": int(self.min_age_s * 1e6)}
        shards = [row.shard for row in (await execute(self.database, _PENDING_SHARDS, params)).all()]
        drains = await asyncio.gather(*(self.drain_shard(shard, wait_s) for shard in shards))
        return sum(d.published for d in drains if d is not None)


async def refresh_outbox_gauges(database: Database) -> None:
    """Pending rows and the age of the oldest: one indexed query."""
    row = (await execute(database, _GAUGES, {})).one()
    outbox_pending.set(row.pending)
    outbox_oldest_age.set((row.oldest_us or 0) / 1e6)


class GaugeRefresh:
    """At a scrape, when the outbox gauges are older than GAUGE_REFRESH_S: refresh them in the
    background (the scrape answers with what is there, never waiting for the database)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._due = 0.0
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._due or (self._task is not None and not self._task.done()):
            return
        self._due = now + GAUGE_REFRESH_S
        self._task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            await refresh_outbox_gauges(self._database)
        except Exception as exc:  # noqa: BLE001 - the gauges keep their last values
            log_event("outbox_gauges_failed", error=repr(exc)[:200])


class OrphanRelay(Protocol):
    async def drain_all(self, wait_s: float = 0.0) -> int: ...

    async def aclose(self) -> None: ...


class KeyPurge(Protocol):
    async def purge_expired_keys(self, budget_s: float = 2.0) -> int: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class RelayTick:
    """What relay_outbox works with (todo_cqrs/bootstrap.relay): the relay of orphaned rows, the store
    whose expired Idempotency-Keys it purges, the outbox gauges it refreshes at its scrapes, and the
    check of who may call it."""

    relay: OrphanRelay
    store: KeyPurge
    gauges: Callable[[], None]
    identity: Callable[[], SenderCheck]

    async def aclose(self) -> None:
        await self.relay.aclose()
        await self.store.aclose()


async def relay_once(s: Settings, min_age_s: float, wait_s: float = 0.0) -> int:
    """Publish pending rows at least `min_age_s` old, with a pool and a producer of its own, closed here."""
    relay = Relay(outbox_database(s), Kafka(s), s, min_age_s)
    try:
        return await relay.drain_all(wait_s)
    finally:
        await relay.aclose()


if __name__ == "__main__":
    # `make relay-once`: publish every pending event now (also rows a live process is about to
    # publish: at worst a duplicate), waiting out a lease held elsewhere.
    config = Settings.from_env()
    count = asyncio.run(relay_once(config, 0.0, wait_s=config.outbox_lease_s + LEASE_MARGIN_S))
    print(f"published {count} pending events", file=sys.stderr)
