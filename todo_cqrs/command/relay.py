"""The outbox relay: publish pending outbox rows to Kafka, oldest first per shard, and mark them published.

The outbox is split in OUTBOX_SHARDS shards (todo id modulo the count; as many as the topic has
partitions by default). A shard is drained only by the holder of its lease, a row of
`outbox_leases` with an expiry (OUTBOX_LEASE_SECONDS, 5 s): one todo's rows are in one shard, so they
reach Kafka in outbox-id order, which is version order (the todo's row lock orders its commands).
Every lease operation is one autocommitted statement, so a holder that freezes, crashes or is cut
off holds no lock in the database: its lease just runs out, and the next process that needs the
shard takes it over. Shards drain in parallel, each in whichever process holds its lease.

Fencing: a holder marks rows published only while its lease is still its own, and sends a batch to
Kafka only when its lease has at least 2 x PUBLISH_TIMEOUT_SECONDS + 1 s left (the longest a batch
waits for Kafka). The one window left: a
holder frozen after handing a batch to its Kafka client and resumed after its lease expired may still
put that batch on the topic after the next holder published the same rows and newer ones. Those are
duplicates of older versions, which the version-gated projection skips (docs/outbox.md).

A crash between Kafka's ack and the `published_at` update publishes the row again later: delivery is
at least once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_cqrs import db, metrics
from todo_cqrs.adapters.publisher import OutboxRecord, publisher
from todo_cqrs.logs import log_event
from todo_cqrs.loop_local import close_loop_resources, loop_local
from todo_cqrs.settings import settings

LEASE_MARGIN_S = 1.0
# A publisher keeps a shard's lease while rows keep coming, and this long after the last; meanwhile
# it looks for rows other processes committed to the shard every HOLD_POLL_S (a read, no write).
LINGER_S = 0.25
HOLD_POLL_S = 0.01
BUSY_POLL_FIRST_S, BUSY_POLL_MAX_S = 0.005, 0.05
EXIT_FLUSH_S = 2.0
GAUGE_REFRESH_S = 5.0

_ACQUIRE = sa.text(
    "INSERT INTO outbox_leases (shard, holder, expires_at) "
    "VALUES (:shard, :holder, UTC_TIMESTAMP(3) + INTERVAL :lease_us MICROSECOND) "
    "ON DUPLICATE KEY UPDATE "
    "holder = IF(holder IS NULL OR expires_at <= UTC_TIMESTAMP(3), VALUES(holder), holder), "
    "expires_at = IF(holder = VALUES(holder), VALUES(expires_at), expires_at)"
)
_RENEW = sa.text(
    "UPDATE outbox_leases SET expires_at = UTC_TIMESTAMP(3) + INTERVAL :lease_us MICROSECOND "
    "WHERE shard = :shard AND holder = :holder AND expires_at > UTC_TIMESTAMP(3)"
)
_RELEASE = sa.text(
    "UPDATE outbox_leases SET holder = NULL, expires_at = UTC_TIMESTAMP(3) "
    "WHERE shard = :shard AND holder = :holder"
)
_PENDING = sa.text(
    "SELECT id, event_id, event_type, todo_id, occurred_at, payload, traceparent, tracestate FROM outbox "
    "WHERE shard = :shard AND published_at IS NULL ORDER BY id LIMIT :limit"
)
_PENDING_THROUGH = sa.text(
    "SELECT 1 FROM outbox WHERE shard = :shard AND published_at IS NULL AND id <= :through LIMIT 1"
)
_PENDING_SHARDS = sa.text("SELECT DISTINCT shard FROM outbox WHERE published_at IS NULL")
_MARK_PUBLISHED = sa.text(
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
outbox_published = Counter("todo_outbox_published", "Outbox rows this process put on Kafka")
outbox_publish_failures = Counter(
    "todo_outbox_publish_failures", "Drains that ended with rows still pending (Kafka or the DB failed)"
)


@loop_local
def publisher_engine() -> AsyncEngine:
    """The publisher's own small pool, autocommitted: a lease statement never leaves a lock behind,
    and commands never wait behind the publisher for a connection."""
    return db.create_engine(
        settings().write_db_url,
        isolation_level="AUTOCOMMIT",
        skip_autocommit_rollback=True,
        pool_size=2,
        max_overflow=2,
    )


async def _execute(statement: sa.Executable, params: dict[str, object]) -> sa.CursorResult[Any]:
    async with db.autocommitted(publisher_engine(), "write") as conn:
        return await conn.execute(statement, params)


@dataclass
class Lease:
    """This process's hold on one shard, until `expires` (monotonic; never later than the DB's expiry)."""

    shard: int
    holder: str
    expires: float

    def remaining(self) -> float:
        return self.expires - time.monotonic()


async def acquire(shard: int) -> Lease | None:
    """The shard's lease if it is free or expired; None while another holder's lease runs."""
    holder = f"{os.getpid()}-{secrets.token_hex(8)}"
    lease_s = settings().outbox_lease_s
    sent = time.monotonic()
    result = await _execute(_ACQUIRE, {"shard": shard, "holder": holder, "lease_us": int(lease_s * 1e6)})
    return Lease(shard, holder, sent + lease_s) if result.rowcount > 0 else None


async def renew(lease: Lease) -> bool:
    lease_s = settings().outbox_lease_s
    sent = time.monotonic()
    result = await _execute(
        _RENEW, {"shard": lease.shard, "holder": lease.holder, "lease_us": int(lease_s * 1e6)}
    )
    if result.rowcount == 0:
        return False
    lease.expires = sent + lease_s
    return True


async def release(lease: Lease) -> None:
    try:
        await _execute(_RELEASE, {"shard": lease.shard, "holder": lease.holder})
    except Exception as exc:  # noqa: BLE001 - the lease then simply expires
        log_event("outbox_lease_release_failed", shard=lease.shard, error=repr(exc)[:200])


async def _pending(shard: int, limit: int) -> list[OutboxRecord]:
    rows = (await _execute(_PENDING, {"shard": shard, "limit": limit})).all()
    return [
        OutboxRecord(
            r.id, r.event_id, r.event_type, r.todo_id, r.occurred_at, r.payload, r.traceparent, r.tracestate
        )
        for r in rows
    ]


async def _mark_published(lease: Lease, outbox_ids: list[int]) -> int:
    result = await _execute(
        _MARK_PUBLISHED, {"ids": outbox_ids, "shard": lease.shard, "holder": lease.holder}
    )
    return result.rowcount


async def has_pending(shard: int, through_id: int | None = None) -> bool:
    """Whether the shard has rows still to publish (up to outbox id `through_id`)."""
    if through_id is None:
        return bool((await _execute(_PENDING, {"shard": shard, "limit": 1})).first())
    return bool((await _execute(_PENDING_THROUGH, {"shard": shard, "through": through_id})).first())


@dataclass
class Drain:
    published: int = 0
    complete: bool = True  # False: rows may still be pending (Kafka failed, or the lease was lost)


async def drain_leased(lease: Lease) -> Drain:
    """Publish the shard's pending rows, batch after batch, while the lease holds.

    A batch shorter than RELAY_BATCH_SIZE was the last: rows committed since then woke their own
    process's publisher, which drains again (no scan that would mostly find nothing)."""
    s = settings()
    outcome = Drain()
    while True:
        if lease.remaining() < 2 * s.publish_timeout_s + LEASE_MARGIN_S and not await renew(lease):
            outcome.complete = False
            return outcome
        records = await _pending(lease.shard, s.relay_batch_size)
        if not records:
            return outcome
        if _publish_in_a_thread:
            delivered = await asyncio.to_thread(publisher().publish, records, s.publish_timeout_s)
        else:  # at interpreter exit no new thread may start; blocking the exit's own loop is fine
            delivered = publisher().publish(records, s.publish_timeout_s)
        if delivered:
            marked = await _mark_published(lease, delivered)
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


async def drain_shard(shard: int, wait_s: float = 0.0, through_id: int | None = None) -> Drain | None:
    """Take the shard's lease (waiting up to wait_s while another process holds it) and drain it.

    None: the lease stayed busy for wait_s, or, with `through_id`, another holder published every
    row up to it meanwhile (nothing left for us to do).
    """
    deadline = time.monotonic() + wait_s
    pause = BUSY_POLL_FIRST_S
    while (lease := await acquire(shard)) is None:
        if through_id is not None and not await has_pending(shard, through_id):
            return None
        if time.monotonic() + pause > deadline:
            return None
        await asyncio.sleep(pause)
        pause = min(pause * 2, BUSY_POLL_MAX_S)
    try:
        return await drain_leased(lease)
    finally:
        await release(lease)


async def has_any_pending() -> bool:
    return bool((await _execute(_PENDING_SHARDS, {})).first())


async def drain_all(wait_s: float = 0.0) -> int:
    """Drain every shard that has pending rows (the scheduled relay); returns how many were published."""
    shards = [row.shard for row in (await _execute(_PENDING_SHARDS, {})).all()]
    drains = await asyncio.gather(*(drain_shard(shard, wait_s) for shard in shards))
    return sum(d.published for d in drains if d is not None)


async def refresh_outbox_gauges() -> None:
    """Pending rows and the age of the oldest: one indexed query."""
    row = (await _execute(_GAUGES, {})).one()
    outbox_pending.set(row.pending)
    outbox_oldest_age.set((row.oldest_us or 0) / 1e6)


class _GaugeRefresh:
    """At a scrape, when the outbox gauges are older than GAUGE_REFRESH_S: refresh them in the
    background (the scrape answers with what is there, never waiting for the database)."""

    def __init__(self) -> None:
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
            await refresh_outbox_gauges()
        except Exception as exc:  # noqa: BLE001 - the gauges keep their last values
            log_event("outbox_gauges_failed", error=repr(exc)[:200])


metrics.on_scrape(_GaugeRefresh())


@dataclass
class _Dirty:
    through_id: int = 0


@dataclass
class OutboxPublisher:
    """This process's publisher: per shard its commands wrote to, one task that takes the shard's
    lease and drains it right after their commits. It keeps the lease while rows keep coming (and
    LINGER_S after the last), looking every HOLD_POLL_S for rows other processes committed, so a busy
    shard costs one lease write per linger, not three per drain. When another process holds the lease,
    it waits until that holder has published its rows, or until the lease expires (a frozen holder)
    and it takes the shard over."""

    waiting: dict[int, _Dirty] = field(default_factory=dict)  # commits not yet covered by a scan
    wakes: dict[int, asyncio.Event] = field(default_factory=dict)
    holders: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)  # held now

    def committed(self, shard: int, outbox_id: int = 0) -> None:
        entry = self.waiting.setdefault(shard, _Dirty())
        entry.through_id = max(entry.through_id, outbox_id)
        self.wakes.setdefault(shard, asyncio.Event()).set()
        holder = self.holders.get(shard)
        if holder is None or holder.done():
            self.holders[shard] = asyncio.get_running_loop().create_task(
                self._hold(shard), name=f"outbox-{shard}"
            )
            _remember_for_exit(self)

    async def aclose(self) -> None:
        """Stop the tasks (what they had not published stays pending: the next drain or the relay
        takes it)."""
        for holder in self.holders.values():
            holder.cancel()
        for holder in self.holders.values():
            with contextlib.suppress(asyncio.CancelledError):
                await holder

    async def _hold(self, shard: int) -> None:
        while (entry := self.waiting.get(shard)) is not None:
            try:
                lease = await _take(shard, entry.through_id or None)
                if lease is None:  # another holder published every row up to ours
                    if self.waiting.get(shard) is entry:
                        del self.waiting[shard]
                    continue
                self.leases[shard] = lease
                try:
                    complete = await self._drain_while_busy(lease)
                finally:
                    del self.leases[shard]
                    await release(lease)
            except Exception as exc:  # noqa: BLE001 - the task must survive any failure; rows stay pending
                log_event("outbox_publish_failed", shard=shard, error=repr(exc)[:300])
                complete = False
            if not complete:  # Kafka or the database failed: rows may be pending; try again later
                self.waiting.setdefault(shard, entry)
                await asyncio.sleep(settings().publish_backoff_s)

    async def _drain_while_busy(self, lease: Lease) -> bool:
        wake = self.wakes.setdefault(lease.shard, asyncio.Event())
        last_work = time.monotonic()
        while True:
            self.waiting.pop(lease.shard, None)  # this drain's scan sees every row committed before it
            wake.clear()
            drained = await drain_leased(lease)
            if not drained.complete:
                return False
            now = time.monotonic()
            if drained.published:
                last_work = now
            elif now - last_work > LINGER_S and lease.shard not in self.waiting:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), HOLD_POLL_S)


async def _take(shard: int, through_id: int | None) -> Lease | None:
    """The shard's lease, waiting while another process holds it (at most its lease's length); None
    when that holder published every row up to `through_id` meanwhile."""
    deadline = time.monotonic() + settings().outbox_lease_s + LEASE_MARGIN_S
    pause = BUSY_POLL_FIRST_S
    while (lease := await acquire(shard)) is None:
        if through_id is not None and not await has_pending(shard, through_id):
            return None
        if time.monotonic() + pause > deadline:
            raise TimeoutError(f"the lease of shard {shard} stayed busy past its expiry")
        await asyncio.sleep(pause)
        pause = min(pause * 2, BUSY_POLL_MAX_S)
    return lease


@loop_local
def outbox_publisher() -> OutboxPublisher:
    return OutboxPublisher()


_at_exit: list[OutboxPublisher] = []
_publish_in_a_thread = True


def _remember_for_exit(publisher_: OutboxPublisher) -> None:
    if not _at_exit:
        atexit.register(_flush_at_exit)
    if publisher_ not in _at_exit:
        _at_exit.append(publisher_)


def _flush_at_exit() -> None:
    """When the process stops (scale-in, redeploy): publish, within EXIT_FLUSH_S, what its commands
    committed and it has not published yet. The relay publishes anything left."""
    global _publish_in_a_thread
    held = [lease for p in _at_exit for lease in p.leases.values()]
    shards = {shard for p in _at_exit for shard in p.waiting} - {lease.shard for lease in held}
    if not held and not shards:
        return

    async def drain_and_release(lease: Lease) -> None:
        try:
            await drain_leased(lease)
        finally:
            await release(lease)

    async def flush() -> None:
        try:
            drains = [*(drain_and_release(lease) for lease in held), *(drain_shard(s) for s in shards)]
            await asyncio.wait_for(asyncio.gather(*drains), EXIT_FLUSH_S)
        finally:
            await close_loop_resources()

    _publish_in_a_thread = False
    try:
        asyncio.run(flush())
    except Exception as exc:  # noqa: BLE001
        print(f"outbox flush at exit incomplete: {exc!r}", file=sys.stderr)


if __name__ == "__main__":
    # `make relay-once`: publish every pending event now, waiting out a lease held elsewhere.
    count = asyncio.run(drain_all(wait_s=settings().outbox_lease_s + LEASE_MARGIN_S))
    print(f"published {count} pending events", file=sys.stderr)
