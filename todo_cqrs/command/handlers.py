"""Command handlers: each change and its event commit in one write-DB transaction, then get published.

A handler returns the reply the HTTP edge sends (made by its `render`), so that a repeat with the
same Idempotency-Key gets exactly that reply again from the database.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from todo_cqrs import tracing
from todo_cqrs.adapters import write_store as store
from todo_cqrs.adapters.publisher import OutboxRecord, publisher
from todo_cqrs.command import idempotency
from todo_cqrs.command.idempotency import IdempotencyKey, Reply
from todo_cqrs.domain import events
from todo_cqrs.domain.errors import NotFound, VersionMismatch
from todo_cqrs.domain.todo import Todo, apply_patch, validate_new, validate_patch
from todo_cqrs.logs import annotate
from todo_cqrs.loop_local import loop_local
from todo_cqrs.outbox.leases import outbox_engine
from todo_cqrs.outbox.publisher import OutboxPublisher
from todo_cqrs.settings import settings


def warm_up() -> None:
    """At cold start: make the Kafka producer (it connects and gets its producer id in the background,
    about half a second), so the first command's event does not wait for it.

    gunicorn imports the function in its master, then forks the worker; librdkafka's threads do not
    survive fork(), so the worker makes its own right after the fork.
    """
    os.register_at_fork(after_in_child=publisher)


@loop_local
def outbox_publisher() -> OutboxPublisher:
    """This process's publisher of its own outbox rows, with a small autocommitted pool of its own."""
    s = settings()
    outbox = OutboxPublisher(publisher, outbox_engine(s), s.publish_timeout_s)
    atexit.register(outbox.flush_at_exit)
    return outbox


Render = Callable[[Todo], Reply]
# A change in the transaction: the todo after it, its event (None: nothing changed), and the outbox
# row of the todo still pending before it (None: none).
Change = Callable[[AsyncConnection], Awaitable[tuple[Todo, events.TodoEvent | None, int | None]]]


async def _locked_todo(conn: AsyncConnection, todo_id: int, if_match: Collection[int] | None) -> store.Locked:
    locked = await store.load_for_update(conn, todo_id)
    if locked is None:
        raise NotFound(f"todo {todo_id} does not exist")
    if if_match is not None and locked.todo.version not in if_match:
        raise VersionMismatch(f"todo {todo_id} is at version {locked.todo.version}, not one If-Match names")
    return locked


async def _commit(change: Change, render: Render, key: IdempotencyKey | None) -> Reply:
    """Run the change with its event, and its key when it has one, in one transaction; then have the
    event published (after the commit, and only if there was one)."""
    trace = tracing.current()

    async def work(conn: AsyncConnection) -> tuple[Reply, OutboxRecord | None, int | None]:
        if key is not None and (stored := await idempotency.claim(conn, key)) is not None:
            annotate(idempotent_replay=True)
            return stored, None, None
        todo, event, pending = await change(conn)
        annotate(todo_id=todo.id)
        record = None
        if event is not None:
            annotate(event_id=event.event_id, version=event.version)
            record = await store.append_event(conn, event, trace)
        reply = render(todo)
        if key is not None:
            await idempotency.store(conn, key, reply)
        return reply, record, pending

    reply, record, pending = await store.run_in_transaction(work)
    if record is not None:
        outbox_publisher().committed(record, after=pending)
    return reply


async def create_todo(body: dict[str, Any], render: Render, key: IdempotencyKey | None = None) -> Reply:
    """Create a todo (version 1, status CREATED) and its todo.created.v1 event."""
    new = validate_new(body)

    async def change(conn: AsyncConnection) -> tuple[Todo, events.TodoEvent, None]:
        todo = await store.insert_todo(conn, new)
        return todo, events.todo_created(todo), None

    return await _commit(change, render, key)


async def update_todo(
    todo_id: int,
    body: dict[str, Any],
    if_match: Collection[int] | None,
    render: Render,
    key: IdempotencyKey | None = None,
) -> Reply:
    """Apply a PATCH; a change that alters nothing keeps the version and emits no event."""
    annotate(todo_id=todo_id)
    changes = validate_patch(body)

    async def change(conn: AsyncConnection) -> tuple[Todo, events.TodoEvent | None, int | None]:
        locked = await _locked_todo(conn, todo_id, if_match)
        updated = apply_patch(locked.todo, changes, locked.now)
        if updated is None:
            return locked.todo, None, None
        await store.save_todo(conn, updated)
        return updated, events.todo_updated(updated), locked.pending_event

    return await _commit(change, render, key)


async def delete_todo(
    todo_id: int, if_match: Collection[int] | None, render: Render, key: IdempotencyKey | None = None
) -> Reply:
    """Delete a todo; answers it as it was, and emits todo.deleted.v1 with the next version."""
    annotate(todo_id=todo_id)

    async def change(conn: AsyncConnection) -> tuple[Todo, events.TodoEvent, int | None]:
        locked = await _locked_todo(conn, todo_id, if_match)
        await store.delete_todo(conn, todo_id)
        deleted = events.todo_deleted(locked.todo, max(locked.now, locked.todo.updated_at))
        return locked.todo, deleted, locked.pending_event

    return await _commit(change, render, key)
