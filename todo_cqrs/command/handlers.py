"""Command handlers: each change and its event commit in one write-DB transaction, then get published."""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

from sqlalchemy.engine import Connection

from todo_cqrs.adapters import write_store as store
from todo_cqrs.adapters.publisher import publisher
from todo_cqrs.command.relay import publish_after_commit
from todo_cqrs.db import write_engine
from todo_cqrs.domain import events
from todo_cqrs.domain.errors import NotFound, VersionMismatch
from todo_cqrs.domain.todo import Todo, apply_patch, utc_now, validate_new, validate_patch
from todo_cqrs.logs import annotate


def _locked_todo(conn: Connection, todo_id: int, if_match: Collection[int] | None) -> Todo:
    todo = store.load_for_update(conn, todo_id)
    if todo is None:
        raise NotFound(f"todo {todo_id} does not exist")
    if if_match is not None and todo.version not in if_match:
        raise VersionMismatch(f"todo {todo_id} is at version {todo.version}, not one If-Match names")
    return todo


def _commit(work: Any) -> Any:
    """Run the change; publish its event after the commit (only if there was one)."""
    result, event = store.run_in_transaction(work)
    if event is not None:
        annotate(event_id=event.event_id, version=event.version)
        publish_after_commit()
    return result


def create_todo(body: dict[str, Any]) -> Todo:
    """Create a todo (version 1, status CREATED) and its todo.created.v1 event."""
    new = validate_new(body)

    def work(conn: Connection) -> tuple[Todo, events.TodoEvent]:
        now = utc_now()
        provisional = new.created(0, now)
        todo_id = store.insert_todo(conn, store.todo_values(provisional))
        todo = new.created(todo_id, now)
        event = events.todo_created(todo)
        store.append_event(conn, event)
        return todo, event

    todo: Todo = _commit(work)
    annotate(todo_id=todo.id)
    return todo


def update_todo(todo_id: int, body: dict[str, Any], if_match: Collection[int] | None) -> Todo:
    """Apply a PATCH; a change that alters nothing keeps the version and emits no event."""
    annotate(todo_id=todo_id)
    changes = validate_patch(body)

    def work(conn: Connection) -> tuple[Todo, events.TodoEvent | None]:
        todo = _locked_todo(conn, todo_id, if_match)
        updated = apply_patch(todo, changes, utc_now())
        if updated is None:
            return todo, None
        store.save_todo(conn, updated)
        event = events.todo_updated(updated)
        store.append_event(conn, event)
        return updated, event

    todo: Todo = _commit(work)
    return todo


def delete_todo(todo_id: int, if_match: Collection[int] | None) -> Todo:
    """Delete a todo; answers it as it was, and emits todo.deleted.v1 with the next version."""
    annotate(todo_id=todo_id)

    def work(conn: Connection) -> tuple[Todo, events.TodoEvent]:
        todo = _locked_todo(conn, todo_id, if_match)
        store.delete_todo(conn, todo_id)
        event = events.todo_deleted(todo, utc_now())
        store.append_event(conn, event)
        return todo, event

    todo: Todo = _commit(work)
    return todo


def warm_up() -> None:
    """At cold start: create the engine and the Kafka producer (it connects in the background),
    so that the first command does not pay for them."""
    write_engine()
    # functions-framework's gunicorn imports the function in its master, then forks the workers;
    # librdkafka's threads do not survive fork(), so a producer made here would hang every flush
    # in a worker. Each worker makes its own, right after the fork.
    os.register_at_fork(after_in_child=publisher)
