"""The write store's contract: the same cases against the in-memory fake the unit tests use
(tests/unit/fakes.FakeWriteStore) and the MariaDB store (todo_cqrs/adapters/write_store.WriteStore), so
what a unit test proves through the fake holds for the real thing.

Each case makes its own todos and keys, so it shares the write database with every other test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from tests.unit.fakes import FakeWriteStore
from todo_cqrs.adapters.write_store import WriteStore, outbox
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.command.unit_of_work import Outcome, Stored, ToPublish, UnitOfWork
from todo_cqrs.db import Database
from todo_cqrs.domain import events
from todo_cqrs.domain.errors import Conflict, IdempotencyKeyReused
from todo_cqrs.domain.todo import NewTodo, Status, Todo, apply_patch
from todo_cqrs.settings import settings

T = TypeVar("T")


@dataclass
class Subject:
    """A store under test, the loop its calls run on, and what stands for the publisher's mark."""

    store: Any
    loop: asyncio.Runner
    mark_published: Callable[[list[int]], Awaitable[None]]

    def run(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> tuple[T, list[ToPublish]]:
        return self.loop.run(self.store.run(work, None))


@pytest.fixture(params=["fake", "mariadb"])
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    with asyncio.Runner() as loop:
        if request.param == "fake":
            fake = FakeWriteStore()

            async def mark_fake(ids: list[int]) -> None:
                fake.mark_published(ids)

            yield Subject(fake, loop, mark_fake)
            return
        request.getfixturevalue("services")
        s = settings()
        real = WriteStore(Database.write(s), s.outbox_shards, s.idempotency_ttl_s)

        async def mark_real(ids: list[int]) -> None:
            async with real.database.transaction() as conn:
                await conn.execute(
                    sa.update(outbox)
                    .where(outbox.c.id.in_(ids))
                    .values(published_at=sa.func.utc_timestamp(3))
                )

        try:
            yield Subject(real, loop, mark_real)
        finally:
            loop.run(real.aclose())


def new_todo(title: str = "") -> NewTodo:
    return NewTodo(title or f"contract {uuid.uuid4()}", "")


def create(subject: Subject, with_event: bool = True) -> tuple[Todo, list[ToPublish]]:
    async def work(uow: UnitOfWork) -> Todo:
        todo = await uow.insert(new_todo())
        if with_event:
            uow.add_event(events.todo_created(todo))
        return todo

    return subject.run(work)


def key(request: str = "POST /todo", body: object = None) -> IdempotencyKey:
    made = IdempotencyKey.of(f"contract-{uuid.uuid4()}", request, body or {"title": "x"}, None)
    assert made is not None
    return made


def test_insert_gives_a_new_id_version_1_and_one_moment_for_created_and_updated(subject: Subject) -> None:
    first, _ = create(subject, with_event=False)
    second, _ = create(subject, with_event=False)

    assert second.id > first.id
    assert (first.version, first.status) == (1, Status.CREATED)
    assert first.created_at == first.updated_at and first.created_at.tzinfo is not None


def test_lock_reads_the_todo_as_inserted_and_none_for_a_missing_one(subject: Subject) -> None:
    todo, _ = create(subject, with_event=False)

    async def lock(uow: UnitOfWork) -> tuple[Any, Any]:
        return await uow.lock(todo.id), await uow.lock(todo.id + 10**12)

    (locked, missing), _ = subject.run(lock)
    assert locked is not None and locked.todo == todo and locked.now >= todo.updated_at
    assert missing is None


def test_a_save_and_a_delete_are_seen_by_the_next_unit_of_work(subject: Subject) -> None:
    kept, _ = create(subject, with_event=False)
    gone, _ = create(subject, with_event=False)

    async def change(uow: UnitOfWork) -> Todo:
        locked = await uow.lock(kept.id)
        assert locked is not None
        updated = apply_patch(locked.todo, {"title": "saved", "status": Status.FINISHED}, locked.now)
        assert updated is not None
        await uow.save(updated)
        await uow.delete(gone.id)
        return updated

    updated, _ = subject.run(change)

    async def read(uow: UnitOfWork) -> tuple[Any, Any]:
        return await uow.lock(kept.id), await uow.lock(gone.id)

    (after, deleted), _ = subject.run(read)
    assert after.todo == updated and (updated.version, updated.title) == (2, "saved")
    assert deleted is None


class Fails(Exception):
    pass


def test_a_unit_of_work_that_fails_leaves_no_todo_no_event_and_its_key_free(subject: Subject) -> None:
    claimed = key()
    inserted: list[Todo] = []

    async def doomed(uow: UnitOfWork) -> None:
        assert await uow.claim(claimed) is None
        todo = await uow.insert(new_todo())
        inserted.append(todo)
        uow.add_event(events.todo_created(todo))
        raise Fails

    with pytest.raises(Fails):
        subject.run(doomed)

    async def look(uow: UnitOfWork) -> tuple[Any, Any]:
        return await uow.lock(inserted[0].id), await uow.claim(claimed)

    (todo, stored), appended = subject.run(look)
    assert (todo, stored, appended) == (None, None, [])


def test_events_come_back_after_the_commit_each_after_its_todos_newest_unpublished_row(
    subject: Subject,
) -> None:
    todo, [created] = create(subject)
    assert created.after is None and created.record.todo_id == todo.id
    assert created.record.event_type == "todo.created.v1"

    def update(title: str) -> ToPublish:
        async def change(uow: UnitOfWork) -> None:
            locked = await uow.lock(todo.id)
            assert locked is not None
            updated = apply_patch(locked.todo, {"title": title}, locked.now)
            assert updated is not None
            await uow.save(updated)
            uow.add_event(events.todo_updated(updated))

        _, [appended] = subject.run(change)
        return appended

    second = update("second")
    assert second.after == created.record.outbox_id  # the create is not on Kafka yet
    assert second.record.outbox_id > created.record.outbox_id
    third = update("third")
    assert third.after == second.record.outbox_id
    subject.loop.run(
        subject.mark_published([created.record.outbox_id, second.record.outbox_id, third.record.outbox_id])
    )
    assert update("fourth").after is None  # every older event is published


def test_a_kept_outcome_comes_back_for_the_same_request_and_a_reuse_is_refused(subject: Subject) -> None:
    first_key = key(body={"title": "first"})

    async def first(uow: UnitOfWork) -> Todo:
        assert await uow.claim(first_key) is None
        todo = await uow.insert(new_todo())
        await uow.keep(first_key, Outcome.CREATED, todo)
        return todo

    todo, _ = subject.run(first)

    async def repeat(uow: UnitOfWork) -> Stored | None:
        return await uow.claim(first_key)

    stored, appended = subject.run(repeat)
    assert stored == Stored(Outcome.CREATED, todo) and appended == []
    other = IdempotencyKey(first_key.key_hash, key(body={"title": "another"}).fingerprint)

    async def reuse(uow: UnitOfWork) -> Stored | None:
        return await uow.claim(other)

    with pytest.raises(IdempotencyKeyReused):
        subject.run(reuse)


def test_a_key_held_by_a_unit_of_work_still_open_is_in_flight(subject: Subject) -> None:
    held = key()

    async def both() -> None:
        taken, release = asyncio.Event(), asyncio.Event()

        async def first(uow: UnitOfWork) -> None:
            assert await uow.claim(held) is None
            taken.set()
            await release.wait()

        async def second(uow: UnitOfWork) -> None:
            await uow.claim(held)

        holder = asyncio.create_task(subject.store.run(first, None))
        await taken.wait()
        try:
            with pytest.raises(Conflict):
                await subject.store.run(second, None)
        finally:
            release.set()
            await holder

    subject.loop.run(both())
