"""The outbox relay: publish pending outbox rows, oldest first, and mark them published.

Every publisher (each command after its commit, and the scheduled relay) drains under one named
database lock, so drains never overlap: rows go to Kafka in outbox-id order, which for one todo is
version order (its commands are serialised by the row lock). A crash between Kafka's ack and the
`published_at` update publishes the row again later: delivery is at least once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from todo_cqrs.adapters.publisher import OutboxRecord, Publisher, publisher
from todo_cqrs.adapters.write_store import naive_utc, outbox
from todo_cqrs.db import write_engine
from todo_cqrs.domain.todo import utc_now
from todo_cqrs.logs import log_event
from todo_cqrs.settings import settings

LOCK_NAME = "todo_outbox_relay"
# A drain takes milliseconds; waiting longer only delays a command when another drain is stuck on Kafka.
INLINE_LOCK_WAIT_S = 0.25


class _Backoff:
    """After Kafka failed, commands skip their inline publish for a while: the relay catches up."""

    def __init__(self) -> None:
        self._until = 0.0
        self._lock = threading.Lock()

    def active(self) -> bool:
        return time.monotonic() < self._until

    def trip(self, seconds: float) -> None:
        with self._lock:
            self._until = time.monotonic() + seconds

    def reset(self) -> None:
        self._until = 0.0


kafka_backoff = _Backoff()


def _pending(conn: Connection, limit: int) -> list[OutboxRecord]:
    rows = conn.execute(
        sa.select(
            outbox.c.id,
            outbox.c.event_id,
            outbox.c.event_type,
            outbox.c.todo_id,
            outbox.c.occurred_at,
            outbox.c.payload,
        )
        .where(outbox.c.published_at.is_(None))
        .order_by(outbox.c.id)
        .limit(limit)
    ).all()
    return [OutboxRecord(r.id, r.event_id, r.event_type, r.todo_id, r.occurred_at, r.payload) for r in rows]


def _mark_published(conn: Connection, outbox_ids: list[int]) -> None:
    conn.execute(
        sa.update(outbox).where(outbox.c.id.in_(outbox_ids)).values(published_at=naive_utc(utc_now()))
    )


def _acquire_relay_lock(conn: Connection, wait_s: float, db_timeout_s: float) -> bool:
    """GET_LOCK, waiting up to wait_s in slices shorter than the connection's read timeout
    (at least db_timeout_s, rounded): one long GET_LOCK would be cut off by it as a lost connection."""
    deadline = time.monotonic() + wait_s
    while True:
        wait = max(0.0, min(db_timeout_s / 2, deadline - time.monotonic()))
        got = conn.execute(sa.text("SELECT GET_LOCK(:name, :wait)"), {"name": LOCK_NAME, "wait": wait})
        if got.scalar() == 1:
            return True
        if time.monotonic() >= deadline:
            return False


def drain_outbox(
    lock_wait_s: float,
    publish_timeout_s: float | None = None,
    get_publisher: Callable[[], Publisher] = publisher,
) -> int:
    """Publish every pending row while holding the relay lock; returns how many were published.

    Waits at most lock_wait_s for another drain to finish (that drain also sees rows committed
    meanwhile). Stops at the first batch Kafka does not fully acknowledge: those rows stay pending.
    """
    s = settings()
    timeout = s.publish_timeout_s if publish_timeout_s is None else publish_timeout_s
    published = 0
    with write_engine().connect().execution_options(isolation_level="READ COMMITTED") as conn:
        if not _acquire_relay_lock(conn, lock_wait_s, s.db_timeout_s):
            conn.rollback()
            return 0
        try:
            conn.commit()
            while True:
                records = _pending(conn, s.relay_batch_size)
                conn.commit()
                if not records:
                    kafka_backoff.reset()
                    return published
                delivered = get_publisher().publish(records, timeout)
                if delivered:
                    _mark_published(conn, delivered)
                    conn.commit()
                    published += len(delivered)
                if len(delivered) < len(records):
                    kafka_backoff.trip(s.publish_backoff_s)
                    return published
        finally:
            try:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": LOCK_NAME})
                conn.commit()
            except DBAPIError:
                conn.invalidate()  # closing the session releases the lock anyway


def publish_after_commit() -> None:
    """Best effort, right after a command commits: never fails the command (the row stays pending)."""
    if kafka_backoff.active():
        return
    try:
        drain_outbox(lock_wait_s=INLINE_LOCK_WAIT_S)
    except Exception as exc:  # noqa: BLE001 - the relay retries whatever this did not publish
        kafka_backoff.trip(settings().publish_backoff_s)
        log_event("outbox_publish_failed", error=repr(exc))


if __name__ == "__main__":
    # `make relay-once`: publish every pending event now, waiting for any drain in progress.
    print(f"published {drain_outbox(lock_wait_s=30)} pending events", file=sys.stderr)
