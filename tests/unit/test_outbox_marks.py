"""todo_cqrs/outbox/publisher.py: every row acknowledged by Kafka gets marked published, also one
acknowledged while the mark before it is still in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

from todo_cqrs.adapters.publisher import OutboxRecord
from todo_cqrs.outbox.publisher import OutboxPublisher

WAIT_S = 5.0  # a bound on each wait below, never a pause


class AcknowledgesAll:
    """Kafka, acknowledging every record at once."""

    def publish(self, records: Sequence[OutboxRecord], timeout_s: float) -> list[int]:
        return [record.outbox_id for record in records]


class GatedDatabase:
    """The write database as the publisher marks rows through it: each mark waits for the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.marking = asyncio.Event()  # set once a mark is in flight
        self.marked: list[int] = []

    @contextlib.asynccontextmanager
    async def autocommitted_statements(self) -> AsyncIterator[GatedDatabase]:
        yield self

    async def execute(self, sql: str, params: list[int]) -> GatedDatabase:
        assert sql.startswith("UPDATE outbox SET published_at"), sql
        self.marking.set()
        await self.gate.wait()
        self.marked.extend(params)
        return self

    async def fetchall(self) -> list[Any]:
        return []


def record(outbox_id: int) -> OutboxRecord:
    return OutboxRecord(outbox_id, f"event-{outbox_id}", "todo.updated.v1", 7, datetime(2026, 12, 2), "{}")


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.001)


def test_a_row_acknowledged_while_a_mark_is_in_flight_is_marked_by_the_next_one() -> None:
    async def scenario() -> list[int]:
        database = GatedDatabase()
        kafka = AcknowledgesAll()
        publisher = OutboxPublisher(lambda: kafka, database, 1.0)  # type: ignore[arg-type]
        publisher.committed(record(1), None)
        await asyncio.wait_for(database.marking.wait(), WAIT_S)  # row 1's mark is in flight
        publisher.committed(record(2), 1)
        await until(lambda: 2 in publisher._sent)  # row 2 is on Kafka, its mark to come
        database.gate.set()
        await until(lambda: not publisher.busy)
        await publisher.stop()
        return database.marked

    assert asyncio.run(scenario()) == [1, 2]
