"""The read store's contract: the same cases against the in-memory fake the unit tests use
(tests/unit/fakes_read.FakeReadStore) and the MariaDB store (todo_cqrs/adapters/read_store.ReadStore):
the version gate (a newer version applies, a duplicate or an older one changes nothing, a tombstone is
never brought back), many changes in one statement, pages by key, and a database that is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.integration.read_model_ids import CREATED, DELETED, FINAL_VERSION, UPDATED, todo_data
from tests.unit.fakes_read import FakeReadStore
from todo_cqrs.adapters.read_store import ReadStore
from todo_cqrs.db import Database
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.domain.events import Change, read_change
from todo_cqrs.domain.todo import Status, Todo
from todo_cqrs.settings import settings

MOMENT = datetime(2026, 11, 27, 10, 1, 0, 500000, tzinfo=UTC)


class Subject:
    """A read store under test and the loop its calls run on; the ids it was given are tombstoned (at a
    version newer than any a case sends) when the case ends, as the integration tests leave theirs."""

    def __init__(self, store: Any, loop: asyncio.Runner) -> None:
        self.store, self.loop = store, loop
        self.used: set[int] = set()

    def apply(self, change: Change) -> bool:
        self.used.add(change.todo_id)
        result: bool = self.loop.run(self.store.apply(change, MOMENT))
        return result

    def apply_all(self, changes: list[Change]) -> list[bool]:
        self.used.update(change.todo_id for change in changes)
        result: list[bool] = self.loop.run(self.store.apply_all([(change, MOMENT) for change in changes]))
        return result

    def get(self, todo_id: int) -> tuple[Todo | None, int | None]:
        result: tuple[Todo | None, int | None] = self.loop.run(self.store.get(todo_id))
        return result

    def page(self, status: Status | None, after_id: int, limit: int) -> list[Todo]:
        result: list[Todo] = self.loop.run(self.store.page(status, after_id, limit))
        return result

    def tombstone_used(self) -> None:
        for todo_id in self.used:
            self.loop.run(self.store.apply(deleted(todo_id, FINAL_VERSION), MOMENT))


@pytest.fixture(params=["fake", "mariadb"])
def subject(request: pytest.FixtureRequest, loop: asyncio.Runner) -> Iterator[Subject]:
    if request.param == "fake":
        yield Subject(FakeReadStore(), loop)
        return
    request.getfixturevalue("services")
    real = ReadStore(Database.read(settings()))
    subject = Subject(real, loop)
    try:
        yield subject
    finally:
        subject.tombstone_used()
        loop.run(real.aclose())


def created(todo_id: int, **fields: Any) -> Change:
    return read_change(CREATED, todo_data(todo_id, 1, **fields))


def updated(todo_id: int, version: int, **fields: Any) -> Change:
    return read_change(UPDATED, todo_data(todo_id, version, **fields))


def deleted(todo_id: int, version: int) -> Change:
    return read_change(DELETED, {"id": todo_id, "version": version})


def test_a_todo_never_seen_is_neither_live_nor_a_tombstone(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)

    assert subject.get(todo_id) == (None, None)


def test_a_created_todo_reads_back_whole_at_its_version(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)
    change = created(todo_id, title="buy milk", description="two litres")

    assert subject.apply(change) is True

    assert subject.get(todo_id) == (change.todo, 1)


def test_a_newer_version_applies_and_replaces_every_field(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)
    subject.apply(created(todo_id))
    newer = updated(todo_id, 3, title="renamed", status=Status.FINISHED.value)

    assert subject.apply(newer) is True

    assert subject.get(todo_id) == (newer.todo, 3)


@pytest.mark.parametrize("version", [2, 1], ids=["duplicate", "older"])
def test_a_duplicate_or_older_version_changes_nothing(
    subject: Subject, fresh_ids: Callable[[int], list[int]], version: int
) -> None:
    [todo_id] = fresh_ids(1)
    subject.apply(created(todo_id))
    held = updated(todo_id, 2, title="held")
    subject.apply(held)

    assert subject.apply(updated(todo_id, version, title="stale")) is False

    assert subject.get(todo_id) == (held.todo, 2)


def test_a_deletion_leaves_a_tombstone_at_its_version(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)
    subject.apply(created(todo_id))

    assert subject.apply(deleted(todo_id, 2)) is True

    assert subject.get(todo_id) == (None, 2)
    assert todo_id not in [todo.id for todo in subject.page(None, todo_id - 1, 1)]


@pytest.mark.parametrize("late", ["created", "updated"])
def test_a_stale_event_never_resurrects_a_deleted_todo(
    subject: Subject, fresh_ids: Callable[[int], list[int]], late: str
) -> None:
    [todo_id] = fresh_ids(1)
    subject.apply(deleted(todo_id, 3))  # the deletion may even arrive first

    stale = created(todo_id) if late == "created" else updated(todo_id, 2)
    assert subject.apply(stale) is False

    assert subject.get(todo_id) == (None, 3)


def test_many_changes_apply_in_one_call_each_gated_in_list_order(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    first, second, third = fresh_ids(3)
    subject.apply(updated(third, 5, title="already newer"))
    changes = [
        created(first),
        updated(first, 2, title="second"),
        updated(first, 2, title="the same version again"),  # a duplicate within the call
        created(second),
        updated(first, 1),  # older than what the call itself applied
        updated(third, 4),  # older than what was held
        deleted(second, 2),
    ]

    assert subject.apply_all(changes) == [True, True, False, True, False, False, True]

    assert subject.get(first) == (changes[1].todo, 2)
    assert subject.get(second) == (None, 2)
    assert subject.get(third)[1] == 5


def test_pages_are_live_todos_after_the_key_in_id_order_with_a_status_filter(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    ids = fresh_ids(5)
    statuses = [Status.CREATED, Status.FINISHED, Status.CREATED, Status.FINISHED, Status.FINISHED]
    for todo_id, status in zip(ids, statuses, strict=True):
        subject.apply(updated(todo_id, 2, status=status.value))
    subject.apply(deleted(ids[3], 3))
    live = [subject.get(todo_id)[0] for todo_id in ids]

    assert subject.page(None, ids[0] - 1, 4) == [live[0], live[1], live[2], live[4]]
    assert subject.page(None, ids[1], 2) == [live[2], live[4]]
    assert subject.page(Status.FINISHED, ids[0] - 1, 2) == [live[1], live[4]]
    assert subject.page(Status.CREATED, ids[0], 1) == [live[2]]


@pytest.fixture(params=["fake", "mariadb"])
def unreachable(request: pytest.FixtureRequest, loop: asyncio.Runner) -> Iterator[Any]:
    """A read store whose database does not answer: the fake's flag, or MariaDB at a closed port."""
    if request.param == "fake":
        yield FakeReadStore(unreachable=True)
        return
    closed = replace(
        settings(), read_db_url="mysql+aiomysql://todo:x@127.0.0.1:1/todo_read", db_timeout_s=0.5
    )
    real = ReadStore(Database.read(closed))
    try:
        yield real
    finally:
        loop.run(real.aclose())


def test_a_database_that_is_down_is_dependency_unavailable_for_every_call(
    unreachable: Any, loop: asyncio.Runner
) -> None:
    change = created(1)
    for call in (
        lambda: unreachable.get(1),
        lambda: unreachable.page(None, 0, 1),
        lambda: unreachable.apply(change, MOMENT),
        lambda: unreachable.apply_all([(change, MOMENT)]),
    ):
        with pytest.raises(DependencyUnavailable):
            loop.run(call())
