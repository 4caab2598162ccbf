"""The projection's grouping (todo_cqrs/projection/handlers.Projector), on the fakes: events that arrive
while a group is being applied go together, in one upsert and one Redis round trip, each still judged on
its own."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy.exc import DataError

from tests.unit.fakes import CREATED, UPDATED, todo_data
from tests.unit.fakes_read import FakeCache, FakeReadStore, fake_projection
from todo_cqrs.domain.errors import InvalidEvent
from todo_cqrs.domain.events import Change
from todo_cqrs.projection.handlers import project_event


class CountingStore(FakeReadStore):
    """The fake read store, counting its statements; changes of `refused` ids fail as MariaDB refuses a
    value its columns cannot hold."""

    def __init__(self, refused: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.refused = refused
        self.statements: list[list[int]] = []

    def _refuse(self, changes: list[Change]) -> None:
        self.statements.append([change.todo_id for change in changes])
        if any(change.todo_id in self.refused for change in changes):
            raise DataError("INSERT INTO todos_view", {}, Exception(1406, "Data too long"))

    async def apply(self, change: Change, event_time: datetime) -> bool:
        self._refuse([change])
        return await super().apply(change, event_time)

    async def apply_all(self, changes: list[tuple[Change, datetime]]) -> list[bool]:
        self._refuse([change for change, _ in changes])
        return await super().apply_all(changes)


class CountingCache(FakeCache):
    def __init__(self) -> None:
        super().__init__()
        self.round_trips: list[list[int]] = []

    async def invalidate_many(self, changes: list[tuple[int, int, str | None]]) -> None:
        self.round_trips.append([todo_id for todo_id, _, _ in changes])
        await super().invalidate_many(changes)


def together(*events: tuple[str, dict[str, Any]], store: FakeReadStore, cache: FakeCache) -> list[Any]:
    """The events handed to one projection at once (as a KafkaSource with many in flight delivers them)."""
    projection = fake_projection(store, cache)

    async def deliver() -> list[Any]:
        return await asyncio.gather(
            *(project_event(projection, event_type, data) for event_type, data in events),
            return_exceptions=True,
        )

    return asyncio.run(deliver())


def test_events_arriving_together_are_applied_in_one_statement_and_invalidated_in_one_round_trip() -> None:
    store, cache = CountingStore(), CountingCache()

    outcomes = together(
        (CREATED, todo_data(7, 1)),
        (UPDATED, todo_data(7, 2)),
        (UPDATED, todo_data(7, 1)),  # older than the one before it in the same group
        (CREATED, todo_data(8, 1)),
        store=store,
        cache=cache,
    )

    assert outcomes == ["applied", "applied", "skipped", "applied"]
    assert store.statements == [[7, 7, 7, 8]]
    assert cache.round_trips == [[7, 7, 7, 8]]
    assert store.version_of(7) == 2 and store.version_of(8) == 1


def test_an_event_the_read_model_refuses_is_found_and_the_rest_of_its_group_applied() -> None:
    store, cache = CountingStore(refused=frozenset({9})), CountingCache()

    outcomes = together(
        (CREATED, todo_data(7, 1)),
        (CREATED, todo_data(9, 1)),
        (CREATED, todo_data(8, 1)),
        store=store,
        cache=cache,
    )

    assert outcomes[0] == outcomes[2] == "applied"
    assert isinstance(outcomes[1], InvalidEvent) and "refuses" in outcomes[1].message
    assert store.statements == [[7, 9, 8], [7], [9], [8]]  # the group, then one at a time
    assert (store.version_of(7), store.version_of(9), store.version_of(8)) == (1, None, 1)
    assert [todo_id for todo_id, _, _ in cache.invalidations] == [7, 8]


@pytest.mark.parametrize("down", ["read_db", "redis"])
def test_a_dependency_down_fails_every_event_of_the_group(down: str) -> None:
    store, cache = CountingStore(), CountingCache()
    store.unreachable = down == "read_db"
    cache.unreachable = down == "redis"

    outcomes = together((CREATED, todo_data(7, 1)), (CREATED, todo_data(8, 1)), store=store, cache=cache)

    assert [type(outcome).__name__ for outcome in outcomes] == ["DependencyUnavailable"] * 2
