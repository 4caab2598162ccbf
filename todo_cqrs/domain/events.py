"""Events of the todo: immutable values with a version, and how the projection reads them back.

`data` of created/updated is the whole todo after the change; `data` of deleted is the id and the
version the deletion produced. Upcasting of older event versions belongs in `read_change`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from todo_cqrs.domain.clock import format_time
from todo_cqrs.domain.errors import InvalidEvent, ValidationFailed
from todo_cqrs.domain.numbers import MAX_ID, MAX_VERSION
from todo_cqrs.domain.todo import Todo, validate_snapshot

TODO_CREATED = "todo.created.v1"
TODO_UPDATED = "todo.updated.v1"
TODO_DELETED = "todo.deleted.v1"
EVENT_TYPES = (TODO_CREATED, TODO_UPDATED, TODO_DELETED)


@dataclass(frozen=True)
class TodoEvent:
    """One change of one todo, as it goes into the outbox and onto Kafka."""

    event_id: str
    type: str
    todo_id: int
    version: int
    time: datetime
    data: dict[str, Any]

    @property
    def payload(self) -> bytes:
        return orjson.dumps(self.data)


def _event(type_: str, todo_id: int, version: int, time: datetime, data: dict[str, Any]) -> TodoEvent:
    return TodoEvent(str(uuid.uuid4()), type_, todo_id, version, time, data)


def todo_created(todo: Todo) -> TodoEvent:
    return _event(TODO_CREATED, todo.id, todo.version, todo.updated_at, todo.to_dict())


def todo_updated(todo: Todo) -> TodoEvent:
    return _event(TODO_UPDATED, todo.id, todo.version, todo.updated_at, todo.to_dict())


def todo_deleted(todo: Todo, now: datetime) -> TodoEvent:
    version = todo.version + 1
    return _event(
        TODO_DELETED,
        todo.id,
        version,
        now,
        {"id": todo.id, "version": version, "deleted_at": format_time(now)},
    )


@dataclass(frozen=True)
class Change:
    """What one event means for the read model: a todo at a version, or its tombstone."""

    todo_id: int
    version: int
    todo: Todo | None  # None for a deletion

    @property
    def deleted(self) -> bool:
        return self.todo is None


def _positive_int(data: dict[str, Any], field: str, maximum: int) -> int:
    value = data.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidEvent(f"data.{field} must be an integer from 1 to {maximum}")
    return value


def check_subject(subject: Any, data: Any) -> None:
    """An event is about the todo its `subject` names: InvalidEvent when data.id names another. (Every
    event of the commands has a subject; data that cannot be read is left to `read_change` to refuse.)"""
    if isinstance(data, bytes | str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
    todo_id = data.get("id") if isinstance(data, dict) else None
    if subject is None or isinstance(todo_id, bool) or not isinstance(todo_id, int):
        return
    if subject != str(todo_id):
        raise InvalidEvent(f"the event's subject {str(subject)[:40]!r} is not its data.id ({todo_id})")


def read_change(event_type: str, data: Any) -> Change:
    """The change an event carries; raises InvalidEvent for one that can never be applied."""
    if event_type not in EVENT_TYPES:
        raise InvalidEvent(f"unknown event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}")
    if isinstance(data, bytes | str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"data is not JSON (or not valid Unicode): {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidEvent("data must be a JSON object")
    todo_id, version = _positive_int(data, "id", MAX_ID), _positive_int(data, "version", MAX_VERSION)
    if event_type == TODO_DELETED:
        return Change(todo_id, version, None)
    try:
        todo = validate_snapshot(data)
    except ValidationFailed as exc:
        raise InvalidEvent(f"data is not a whole todo: {exc.details}") from exc
    return Change(todo_id, version, todo)
