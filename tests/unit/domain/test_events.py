"""The todo's events: what each carries per the contract, and how the projection reads one back."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from todo_cqrs.domain import events
from todo_cqrs.domain.errors import InvalidEvent
from todo_cqrs.domain.numbers import MAX_ID, MAX_VERSION
from todo_cqrs.domain.todo import Status, Todo

T0 = datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)
T1 = T0 + timedelta(seconds=30)
TODO = Todo(7, "buy milk", "2 l", Status.IN_PROGRESS, 3, T0, T1)
WHOLE = {
    "id": 7,
    "title": "buy milk",
    "description": "2 l",
    "status": "IN_PROGRESS",
    "version": 3,
    "created_at": "2026-11-27T10:00:00.123Z",
    "updated_at": "2026-11-27T10:00:30.123Z",
}


# --- making events ------------------------------------------------------------------------------


def test_created_event_carries_the_whole_todo_at_its_version() -> None:
    event = events.todo_created(TODO)

    assert event.type == "todo.created.v1"
    assert (event.todo_id, event.version, event.time) == (7, 3, T1)
    assert event.data == WHOLE


def test_updated_event_carries_the_whole_todo_after_the_change() -> None:
    event = events.todo_updated(TODO)

    assert event.type == "todo.updated.v1"
    assert (event.todo_id, event.version) == (7, 3)
    assert event.data == WHOLE


def test_deleted_event_carries_the_id_and_the_version_the_deletion_produced() -> None:
    now = T1 + timedelta(minutes=1)

    event = events.todo_deleted(TODO, now)

    assert event.type == "todo.deleted.v1"
    assert (event.todo_id, event.version, event.time) == (7, 4, now)
    assert event.data["id"] == 7 and event.data["version"] == 4
    assert event.data["deleted_at"] == "2026-11-27T10:01:30.123Z"


def test_every_event_gets_its_own_uuid() -> None:
    ids = {
        events.todo_created(TODO).event_id,
        events.todo_updated(TODO).event_id,
        events.todo_deleted(TODO, T1).event_id,
        events.todo_created(TODO).event_id,
    }

    assert len(ids) == 4
    assert all(uuid.UUID(event_id).version == 4 for event_id in ids)


def test_event_types_are_the_three_of_the_contract() -> None:
    assert events.EVENT_TYPES == ("todo.created.v1", "todo.updated.v1", "todo.deleted.v1")


def test_payload_is_the_data_as_utf8_json() -> None:
    event = events.todo_created(Todo(7, "café ☕", "", Status.CREATED, 1, T0, T0))

    assert json.loads(event.payload.decode("utf-8")) == event.data
    assert "café ☕".encode() in event.payload


def test_event_is_immutable() -> None:
    event = events.todo_created(TODO)

    with pytest.raises(AttributeError):
        event.version = 9  # type: ignore[misc]


# --- reading events back ------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", ["todo.created.v1", "todo.updated.v1"])
def test_created_or_updated_reads_back_as_the_todo(event_type: str) -> None:
    change = events.read_change(event_type, dict(WHOLE))

    assert change == events.Change(7, 3, TODO)
    assert not change.deleted


def test_deleted_reads_back_as_a_tombstone_at_its_version() -> None:
    change = events.read_change("todo.deleted.v1", {"id": 7, "version": 4})

    assert change == events.Change(7, 4, None)
    assert change.deleted


def test_an_event_made_here_reads_back_as_the_same_change() -> None:
    deleted = events.todo_deleted(TODO, T1)

    assert events.read_change(deleted.type, deleted.payload) == events.Change(7, 4, None)
    updated = events.todo_updated(TODO)
    assert events.read_change(updated.type, updated.payload) == events.Change(7, 3, TODO)


@pytest.mark.parametrize("data", [json.dumps(WHOLE).encode(), json.dumps(WHOLE)])
def test_data_as_json_bytes_or_text_is_read(data: bytes | str) -> None:
    assert events.read_change("todo.updated.v1", data).todo == TODO


@pytest.mark.parametrize("event_type", ["todo.archived.v1", "todo.created.v2", "", "TODO.CREATED.V1"])
def test_unknown_event_type_is_invalid(event_type: str) -> None:
    with pytest.raises(InvalidEvent, match="unknown event type"):
        events.read_change(event_type, dict(WHOLE))


@pytest.mark.parametrize("data", [b"not json", b"\xff\xfe", "{", b""])
def test_data_that_is_not_json_is_invalid(data: bytes | str) -> None:
    with pytest.raises(InvalidEvent, match="not JSON"):
        events.read_change("todo.deleted.v1", data)


@pytest.mark.parametrize("data", [None, [1, 2], 7, "7", b"[]", b'"x"'])
def test_data_that_is_not_an_object_is_invalid(data: Any) -> None:
    with pytest.raises(InvalidEvent, match="JSON object"):
        events.read_change("todo.deleted.v1", data)


@pytest.mark.parametrize("field", ["id", "version"])
@pytest.mark.parametrize("value", ["missing", None, 0, -1, "7", 1.5, 2.0, True])
def test_id_or_version_that_is_not_a_positive_integer_is_invalid(field: str, value: Any) -> None:
    data: dict[str, Any] = {"id": 7, "version": 4}
    if value == "missing":
        del data[field]
    else:
        data[field] = value

    with pytest.raises(InvalidEvent, match=f"data.{field}"):
        events.read_change("todo.deleted.v1", data)


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", MAX_ID + 1), ("id", 2**64), ("id", 10**400), ("version", MAX_VERSION + 1), ("version", 2**40)],
)
def test_id_or_version_beyond_its_column_is_invalid(field: str, value: int) -> None:
    data = {"id": 7, "version": 4, field: value}

    with pytest.raises(InvalidEvent, match=f"data.{field}"):
        events.read_change("todo.deleted.v1", data)


def test_id_and_version_at_their_columns_limits_are_read() -> None:
    change = events.read_change("todo.deleted.v1", {"id": MAX_ID, "version": MAX_VERSION})

    assert change == events.Change(MAX_ID, MAX_VERSION, None)


@pytest.mark.parametrize(
    "data",
    [
        b'{"id": 7, "version": 1, "title": "\\ud800"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"id": 1' + b"0" * 5000 + b"}",
    ],
)
def test_data_that_no_json_reader_takes_is_invalid_not_a_crash(data: bytes) -> None:
    with pytest.raises(InvalidEvent):
        events.read_change("todo.created.v1", data)


def test_whole_todo_holding_a_lone_surrogate_is_invalid() -> None:
    with pytest.raises(InvalidEvent, match="not a whole todo"):
        events.read_change("todo.created.v1", {**WHOLE, "title": "\ud800"})


@pytest.mark.parametrize(
    "broken",
    [
        {"title": "missing"},
        {"status": "DONE"},
        {"status": None},
        {"created_at": "yesterday"},
        {"updated_at": "missing"},
        {"created_at": 1764237600},
    ],
)
def test_created_data_that_is_not_a_whole_todo_is_invalid(broken: dict[str, Any]) -> None:
    data = dict(WHOLE)
    for field, value in broken.items():
        if value == "missing":
            del data[field]
        else:
            data[field] = value

    with pytest.raises(InvalidEvent, match="not a whole todo"):
        events.read_change("todo.created.v1", data)
