"""The in-process publisher: a command process puts its own committed outbox rows on Kafka right away.

After a command commits, its handler hands the row (built in memory: no read of the outbox) to this
process's publisher, which sends every row handed to it since its last batch in one call to Kafka,
then marks them published in one UPDATE. Nothing polls: it waits for rows and for Kafka's acks.

Order per todo: a command reads, under its todo's row lock, the newest outbox row of that todo still
pending (`after`). None: every older event of the todo is on Kafka, so this one may go at once. A row
of this process: it goes after it, in this process's order (the producer keeps the order of a
partition). A row of another process: it waits until that row is marked published (polled with a
backoff, only in this case).

A row Kafka did not acknowledge in time is sent again, until DIRECT_WINDOW_S (3 s) after its commit;
after that (Kafka kept failing it, its predecessor never came, the process was frozen) it is left to
the relay, which takes rows pending
OUTBOX_ORPHAN_SECONDS (10 s), when no process will publish them any more (relay.py). The producer's message
timeout keeps a row handed to Kafka from arriving after that (adapters/publisher.py).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from todo_cqrs.adapters.publisher import DIRECT_WINDOW_S, Kafka, OutboxRecord, Publisher
from todo_cqrs.db import Database
from todo_cqrs.logs import log_event
from todo_cqrs.loop_local import LoopLocal
from todo_cqrs.outbox.metrics import outbox_publish_failures, outbox_published

POLL_FIRST_S, POLL_MAX_S = 0.002, 0.02
# Rows on Kafka are marked published at most this long after their ack, together: one UPDATE for
# all that came meanwhile, not one per batch (only a later row of the same todo committed by another
# process waits for the mark).
MARK_EVERY_S = 0.02
# On the driver's connection (db.Statements), as the commands' statements: through SQLAlchemy's
# execution layer (an expanding IN compiled per call, a greenlet switch, result processing) the marks
# cost create_todo 0.05 ms more of CPU per create at 100 creates/s (a mark every 20 ms).
_MARK = "UPDATE outbox SET published_at = UTC_TIMESTAMP(3) WHERE id IN ({ids}) AND published_at IS NULL"
_STILL_PENDING = "SELECT id FROM outbox WHERE id IN ({ids}) AND published_at IS NULL"


@dataclass(frozen=True)
class Committed:
    """A row just committed, and the pending row of its todo it must follow (None: none)."""

    record: OutboxRecord
    after: int | None
    at: float  # monotonic, when the commit returned


class OutboxPublisher:
    """This process's rows on their way to Kafka. `start()` in the process's event loop, then
    `committed()` after each commit; `stop()` publishes what is left (bounded) and ends the task."""

    def __init__(self, kafka: Callable[[], Publisher], database: Database, publish_timeout_s: float) -> None:
        self._kafka = kafka
        self._database = database
        self._publish_timeout_s = publish_timeout_s
        self._queue: list[Committed] = []  # in commit order
        self._local: set[int] = set()  # outbox ids handed to this publisher, not yet published or given up
        self._sent: set[int] = set()  # recently on Kafka (acknowledged): rows after them may go
        self._given_up: set[int] = set()  # left to the relay: rows after them must be left too
        self._unmarked: list[int] = []  # on Kafka, not yet marked published
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._marking: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """Rows handed over and not yet published (and marked) or given up."""
        return bool(self._local or self._unmarked)

    def __repr__(self) -> str:
        queued = [(c.record.outbox_id, c.after) for c in self._queue]
        task = "none" if self._task is None else "done" if self._task.done() else "running"
        local = sorted(self._local)
        return f"OutboxPublisher(queued={queued}, local={local}, unmarked={self._unmarked}, task={task})"

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-publisher")

    def committed(self, record: OutboxRecord, after: int | None) -> None:
        self._local.add(record.outbox_id)
        self._queue.append(Committed(record, after, time.monotonic()))
        self._wake.set()
        self.start()

    async def stop(self, within_s: float = 2.0) -> None:
        """Publish what is queued (at most `within_s`), then end; what is left, the relay takes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while self._local and self._task is not None and not self._task.done():
                    await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._marking is not None:
            self._marking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._marking
        await self._mark_now()

    async def aclose(self) -> None:
        """Stop, then close the pool (the end of the event loop that made this publisher)."""
        await self.stop()
        await self._database.aclose()

    async def _run(self) -> None:
        pause = POLL_FIRST_S
        while True:
            try:
                progressed = await self._publish_ready()
            except Exception as exc:  # noqa: BLE001 - the task must survive; rows stay pending for the relay
                log_event("outbox_publish_failed", error=repr(exc)[:300])
                outbox_publish_failures.inc()
                progressed = False
            if progressed:
                pause = POLL_FIRST_S
                continue
            if self._queue:  # only rows waiting for another process's row: look again after a pause
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
                pause = min(pause * 2, POLL_MAX_S)
            else:
                await self._wake.wait()
            self._wake.clear()

    def _take_sendable(self) -> tuple[list[Committed], bool]:
        """What may go now, in commit order (taken off the queue), and whether any row was given up."""
        now = time.monotonic()
        send: list[Committed] = []
        going: set[int] = set()
        keep: list[Committed] = []
        gave_up = False
        for item in self._queue:
            outbox_id = item.record.outbox_id
            if now - item.at > DIRECT_WINDOW_S or item.after in self._given_up:
                self._give_up(outbox_id)
                gave_up = True
            elif item.after is None or item.after in self._sent or item.after in going:
                send.append(item)  # after its todo's older row: on Kafka already, or earlier in this batch
                going.add(outbox_id)
            else:
                keep.append(item)
        self._queue = keep
        return send, gave_up

    async def _publish_ready(self) -> bool:
        """Send what may go now, give up what waited too long; False when nothing moved."""
        if not self._queue:
            return False
        await self._release_followers()
        send, gave_up = self._take_sendable()
        if not send:
            return gave_up
        records = [item.record for item in send]
        try:
            delivered = await asyncio.to_thread(self._kafka().publish, records, self._publish_timeout_s)
        except Exception:
            for item in send:
                self._give_up(item.record.outbox_id)
            raise
        if len(delivered) < len(records):
            # Not acknowledged in time (a producer still connecting, a broker restarting): sent again
            # first, in commit order, until its window is over; what follows it keeps waiting for it.
            outbox_publish_failures.inc()
            self._queue = [item for item in send if item.record.outbox_id not in delivered] + self._queue
        if delivered:
            self._local.difference_update(delivered)
            _remember(self._sent, delivered)
            outbox_published.inc(len(delivered))
            self._unmarked += delivered
            if self._marking is None or self._marking.done():
                self._marking = asyncio.get_running_loop().create_task(self._mark_soon())
        return True

    async def _mark_soon(self) -> None:
        """Mark what is on Kafka every MARK_EVERY_S, until nothing is left: rows acknowledged while a mark
        is in flight are marked by the next one (no other task is started for them meanwhile)."""
        while self._unmarked:
            await asyncio.sleep(MARK_EVERY_S)
            await self._mark_now()

    async def _mark_now(self) -> None:
        """Mark what is on Kafka; a row the mark misses (the DB failed) goes out again as an orphan,
        a duplicate that the projection skips."""
        ids, self._unmarked = self._unmarked, []
        if not ids:
            return
        try:
            await _autocommitted(self._database, _MARK, ids)
        except Exception as exc:  # noqa: BLE001 - the relay publishes them again later
            log_event("outbox_mark_failed", rows=len(ids), error=repr(exc)[:300])

    def flush_at_exit(self) -> None:
        """When the process stops (scale-in, redeploy), its event loop gone: publish what may still go,
        within the publish timeout, and mark it; the relay takes anything left."""
        send, _ = self._take_sendable()
        delivered = list(self._unmarked)
        if not send and not delivered:
            return
        try:
            if send:
                delivered += self._kafka().publish([item.record for item in send], self._publish_timeout_s)
            if delivered:
                asyncio.run(_mark_in_new_loop(self._database, delivered))
        except Exception as exc:  # noqa: BLE001 - the relay publishes what is left
            print(f"outbox flush at exit incomplete: {exc!r}", file=sys.stderr)

    async def _release_followers(self) -> None:
        """Rows waiting for another process's row: those whose row is now published may go."""
        foreign = {
            c.after
            for c in self._queue
            if c.after is not None and c.after not in self._local | self._sent | self._given_up
        }
        if not foreign:
            return
        rows = await _autocommitted(self._database, _STILL_PENDING, sorted(foreign))
        still_pending = {row[0] for row in rows}
        self._queue = [
            Committed(c.record, None, c.at) if c.after in foreign and c.after not in still_pending else c
            for c in self._queue
        ]

    def _give_up(self, outbox_id: int) -> None:
        log_event("outbox_row_left_to_relay", outbox_id=outbox_id)
        self._local.discard(outbox_id)
        _remember(self._given_up, [outbox_id])


async def _mark_in_new_loop(database: Database, outbox_ids: list[int]) -> None:
    """Mark rows published from a new event loop (the pool of the old one is of no use in it): the
    database makes an engine for this loop, closed here."""
    try:
        await _autocommitted(database, _MARK, outbox_ids)
    finally:
        await database.aclose()


async def _autocommitted(database: Database, sql: str, outbox_ids: list[int]) -> tuple[Any, ...]:
    """One autocommitted statement about some outbox rows (`IN ({ids})`), under the database's deadline;
    its rows."""
    placeholders = ", ".join(["%s"] * len(outbox_ids))
    async with database.autocommitted_statements() as statements:
        return tuple(await (await statements.execute(sql.format(ids=placeholders), outbox_ids)).fetchall())


def _remember(ids: set[int], more: list[int], keep: int = 4096) -> None:
    """Add to a set of recent outbox ids, bounded: only recent rows can have followers still queued."""
    ids.update(more)
    if len(ids) > 2 * keep:
        newest = sorted(ids)[-keep:]
        ids.clear()
        ids.update(newest)


class ProcessPublisher:
    """The command process's publisher (`committed`), one OutboxPublisher per event loop, made on the first
    commit in it (a function serves from one loop; the tests run several)."""

    def __init__(self, kafka: Kafka, database: Database, publish_timeout_s: float) -> None:
        self._kafka = kafka
        self._database = database
        self._local = LoopLocal(self._make)
        self._publish_timeout_s = publish_timeout_s

    def _make(self) -> OutboxPublisher:
        outbox = OutboxPublisher(self._kafka, self._database, self._publish_timeout_s)
        atexit.register(outbox.flush_at_exit)  # the process ends: publish what may still go
        return outbox

    def committed(self, record: OutboxRecord, after: int | None) -> None:
        self._local().committed(record, after)

    def warm_up(self) -> None:
        """Make the producer now, if there is none: it connects and gets its producer id in its own
        threads. Made at the first commit instead, it held that commit's event about 500 ms: librdkafka's
        idempotent producer asks for its id again only after a 500 ms timer when the broker it learnt from
        the bootstrap connection is not connected yet."""
        self._kafka()

    def in_this_loop(self) -> OutboxPublisher | None:
        """This loop's publisher, if a commit made one."""
        return self._local.peek()

    async def aclose(self) -> None:
        """Publish what is left (bounded), then close this loop's pool and the producer (the next commit
        makes them again)."""
        outbox = self._local.peek()
        if outbox is not None:
            self._local.forget()
            atexit.unregister(outbox.flush_at_exit)
            await outbox.aclose()
        else:
            await self._database.aclose()
        self._kafka.close()
