"""The outbox relay: publish pending outbox rows, oldest first, and mark them published.

Every drain (a process's publisher thread after its commands commit, and the scheduled relay) runs
under one named database lock, so drains never overlap: rows go to Kafka in outbox-id order, which
for one todo is version order (its commands are serialised by the row lock). A crash between
Kafka's ack and the `published_at` update publishes the row again later: delivery is at least once.
"""

from __future__ import annotations

import atexit
import os
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
# The publisher thread waits its turn behind other drains; no request waits on this.
PUBLISHER_LOCK_WAIT_S = 10.0
EXIT_FLUSH_S = 2.0


class _Backoff:
    """After Kafka failed, commands stop waiting for their event to be published for a while."""

    def __init__(self) -> None:
        self._until = 0.0
        self._lock = threading.Lock()

    def active(self) -> bool:
        return time.monotonic() < self._until

    def remaining(self) -> float:
        return max(0.0, self._until - time.monotonic())

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
) -> int | None:
    """Publish every pending row while holding the relay lock; returns how many were published, or
    None when another drain kept the lock for lock_wait_s (that drain sees our rows too).

    Stops at the first batch Kafka does not fully acknowledge: those rows stay pending. The write
    engine reads committed data statement by statement, so each scan sees rows committed meanwhile.
    """
    s = settings()
    timeout = s.publish_timeout_s if publish_timeout_s is None else publish_timeout_s
    published = 0
    with write_engine().connect() as conn:
        if not _acquire_relay_lock(conn, lock_wait_s, s.db_timeout_s):
            conn.rollback()
            return None
        try:
            while True:
                records = _pending(conn, s.relay_batch_size)
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


class OutboxPublisher:
    """This process's publisher: one thread that drains the outbox after commits, batching them.

    `publish(wait_s)` wakes the thread and waits at most wait_s until a drain that began after the
    call has finished (by then the caller's rows are on Kafka, unless Kafka failed: then they stay
    pending, the thread retries after a backoff, and so does the relay). Commands committed while a
    drain runs share the next one instead of queueing for the lock one by one.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._asked = 0  # publish() calls so far
        self._served = 0  # calls covered by a finished drain
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # Threads do not survive fork(); the child (a gunicorn worker) starts its own on first use,
        # and when it stops (scale-in, redeploy) first gives it a moment to send what it has.
        self._changed = threading.Condition()
        self._thread = None
        atexit.register(self._finish, EXIT_FLUSH_S)

    def publish(self, wait_s: float) -> None:
        with self._changed:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
                self._thread.start()
            self._asked += 1
            ticket = self._asked
            self._changed.notify_all()
            if wait_s > 0:
                self._changed.wait_for(lambda: self._served >= ticket, timeout=wait_s)

    def _finish(self, wait_s: float) -> None:
        """At exit: wait (bounded) for a drain in progress or asked for; start nothing new."""
        with self._changed:
            if self._thread is not None and self._thread.is_alive():
                target = self._asked
                self._changed.wait_for(lambda: self._served >= target, timeout=wait_s)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._asked > self._served)
                target = self._asked
            complete = self._drain()
            with self._changed:
                self._served = target
                self._changed.notify_all()
                if not complete:
                    self._asked += 1  # rows may still be pending: try again after the backoff
            if not complete:
                time.sleep(max(kafka_backoff.remaining(), settings().publish_backoff_s))

    @staticmethod
    def _drain() -> bool:
        try:
            published = drain_outbox(lock_wait_s=PUBLISHER_LOCK_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the thread must survive any failure; the row stays pending
            kafka_backoff.trip(settings().publish_backoff_s)
            log_event("outbox_publish_failed", error=repr(exc)[:300])
            return False
        return published is not None and not kafka_backoff.active()


outbox_publisher = OutboxPublisher()


def publish_after_commit() -> None:
    """Right after a command commits: have its event published; never fails the command.

    By default the command does not wait (its latency is its transaction's): the process's publisher
    sends it within milliseconds. PUBLISH_WAIT_SECONDS > 0 makes the command wait that long at most.
    """
    wait_s = 0.0 if kafka_backoff.active() else settings().publish_wait_s
    outbox_publisher.publish(wait_s)


if __name__ == "__main__":
    # `make relay-once`: publish every pending event now, waiting for any drain in progress.
    print(f"published {drain_outbox(lock_wait_s=30) or 0} pending events", file=sys.stderr)
