"""Command handlers: each change and its event commit in one unit of work, then get published.

A handler takes what it works with (`Commands`: the write store and the publisher) and returns what
the command came to (`Result`); the web layer renders it. A repeat with the same Idempotency-Key gets
the first request's outcome and todo back from the store, so it is rendered exactly as the first time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from todo_cqrs import tracing
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.command.unit_of_work import Locked, Outcome, Publisher, UnitOfWork, WriteStore
from todo_cqrs.domain import events
from todo_cqrs.domain.errors import NotFound, VersionMismatch
from todo_cqrs.domain.todo import Todo, apply_patch, validate_new, validate_patch
from todo_cqrs.logs import annotate


@dataclass(frozen=True)
class Commands:
    """What the command functions work with (made by todo_cqrs/bootstrap.py, or fakes in the tests)."""

    store: WriteStore
    publisher: Publisher

    async def aclose(self) -> None:
        await self.publisher.aclose()
        await self.store.aclose()


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    todo: Todo  # after the change; as it was before, for a delete


# A command's change inside its unit of work: what it came to, and the todo to answer with.
Change = Callable[[UnitOfWork], Awaitable[tuple[Outcome, Todo]]]


async def _locked(uow: UnitOfWork, todo_id: int, if_match: Collection[int] | None) -> Locked:
    locked = await uow.lock(todo_id)
    if locked is None:
        raise NotFound(f"todo {todo_id} does not exist")
    if if_match is not None and locked.todo.version not in if_match:
        raise VersionMismatch(f"todo {todo_id} is at version {locked.todo.version}, not one If-Match names")
    return locked


def _emit(uow: UnitOfWork, event: events.TodoEvent) -> None:
    annotate(event_id=event.event_id, version=event.version)
    uow.add_event(event)


async def _run(c: Commands, change: Change, key: IdempotencyKey | None) -> Result:
    """The change, with its key when it has one, in one unit of work; then its events to the publisher
    (after the commit, and only those it committed)."""

    async def work(uow: UnitOfWork) -> Result:
        if key is not None and (stored := await uow.claim(key)) is not None:
            annotate(idempotent_replay=True)
            return Result(stored.outcome, stored.todo)
        outcome, todo = await change(uow)
        annotate(todo_id=todo.id)
        if key is not None:
            await uow.keep(key, outcome, todo)
        return Result(outcome, todo)

    result, committed = await c.store.run(work, tracing.current())
    for row in committed:
        c.publisher.committed(row.record, row.after)
    return result


async def create_todo(c: Commands, body: dict[str, Any], key: IdempotencyKey | None = None) -> Result:
    """Create a todo (version 1, status CREATED) and its todo.created.v1 event."""
    new = validate_new(body)

    async def change(uow: UnitOfWork) -> tuple[Outcome, Todo]:
        todo = await uow.insert(new)
        _emit(uow, events.todo_created(todo))
        return Outcome.CREATED, todo

    return await _run(c, change, key)


async def update_todo(
    c: Commands,
    todo_id: int,
    body: dict[str, Any],
    if_match: Collection[int] | None,
    key: IdempotencyKey | None = None,
) -> Result:
    """Apply a PATCH; a change that alters nothing keeps the version and emits no event."""
    annotate(todo_id=todo_id)
    changes = validate_patch(body)

    async def change(uow: UnitOfWork) -> tuple[Outcome, Todo]:
        locked = await _locked(uow, todo_id, if_match)
        updated = apply_patch(locked.todo, changes, locked.now)
        if updated is None:
            return Outcome.UPDATED, locked.todo
        await uow.save(updated)
        _emit(uow, events.todo_updated(updated))
        return Outcome.UPDATED, updated

    return await _run(c, change, key)


async def delete_todo(
    c: Commands, todo_id: int, if_match: Collection[int] | None, key: IdempotencyKey | None = None
) -> Result:
    """Delete a todo; answers it as it was, and emits todo.deleted.v1 with the next version."""
    annotate(todo_id=todo_id)

    async def change(uow: UnitOfWork) -> tuple[Outcome, Todo]:
        locked = await _locked(uow, todo_id, if_match)
        await uow.delete(todo_id)
        _emit(uow, events.todo_deleted(locked.todo, max(locked.now, locked.todo.updated_at)))
        return Outcome.DELETED, locked.todo

    return await _run(c, change, key)
