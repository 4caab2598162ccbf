"""The todo's rules: validation of create and PATCH bodies, what a change does, and the time format."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from todo_cqrs.domain.errors import ValidationFailed
from todo_cqrs.domain.todo import (
    DESCRIPTION_MAX,
    TITLE_MAX,
    NewTodo,
    Status,
    Todo,
    apply_patch,
    format_time,
    parse_time,
    utc_now,
    validate_new,
    validate_patch,
)

T0 = datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
RFC3339_UTC_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def fields_of(error: pytest.ExceptionInfo[ValidationFailed]) -> list[str]:
    return [problem["field"] for problem in error.value.details]


def todo(**fields: Any) -> Todo:
    values: dict[str, Any] = {
        "id": 7,
        "title": "buy milk",
        "description": "",
        "status": Status.CREATED,
        "version": 1,
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(fields)
    return Todo(**values)


# --- create -------------------------------------------------------------------------------------


def test_create_body_with_title_only_gets_an_empty_description() -> None:
    assert validate_new({"title": "buy milk"}) == NewTodo("buy milk", "")


def test_create_body_keeps_title_and_description_as_given() -> None:
    assert validate_new({"title": " buy milk ", "description": "2 l"}) == NewTodo(" buy milk ", "2 l")


def test_new_todo_is_created_at_version_1_with_status_created() -> None:
    created = NewTodo("buy milk", "2 l").created(7, T0)

    assert created == Todo(7, "buy milk", "2 l", Status.CREATED, 1, T0, T0)


def test_missing_title_is_rejected() -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_new({"description": "x"})

    assert fields_of(error) == ["title"]
    assert "required" in error.value.details[0]["message"]


@pytest.mark.parametrize("title", ["", " ", " \t\n "])
def test_blank_title_is_rejected(title: str) -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_new({"title": title})

    assert fields_of(error) == ["title"]


def test_title_of_255_characters_is_accepted_and_256_is_rejected() -> None:
    assert validate_new({"title": "t" * TITLE_MAX}).title == "t" * 255

    with pytest.raises(ValidationFailed) as error:
        validate_new({"title": "t" * (TITLE_MAX + 1)})

    assert fields_of(error) == ["title"]
    assert "255" in error.value.details[0]["message"]


@pytest.mark.parametrize("title", [None, 5, 1.5, True, ["a"], {"a": 1}])
def test_title_that_is_not_a_string_is_rejected(title: Any) -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_new({"title": title})

    assert fields_of(error) == ["title"]
    assert error.value.details[0]["message"] == "must be a string"


def test_description_of_2000_characters_is_accepted_and_2001_is_rejected() -> None:
    assert validate_new({"title": "a", "description": "d" * DESCRIPTION_MAX}).description == "d" * 2000

    with pytest.raises(ValidationFailed) as error:
        validate_new({"title": "a", "description": "d" * (DESCRIPTION_MAX + 1)})

    assert fields_of(error) == ["description"]


def test_blank_description_is_accepted() -> None:
    assert validate_new({"title": "a", "description": "   "}).description == "   "


@pytest.mark.parametrize("description", [None, 3, ["x"]])
def test_description_that_is_not_a_string_is_rejected(description: Any) -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_new({"title": "a", "description": description})

    assert fields_of(error) == ["description"]


@pytest.mark.parametrize("field", ["priority", "id", "version", "status"])
def test_unknown_field_on_create_is_rejected(field: str) -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_new({"title": "a", field: "CREATED"})

    assert fields_of(error) == [field]


def test_every_problem_of_a_create_body_is_listed_at_once() -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_new({"colour": "red", "description": 3})

    assert sorted(fields_of(error)) == ["colour", "description", "title"]
    assert error.value.code == "validation_failed"


# --- PATCH --------------------------------------------------------------------------------------


def test_empty_patch_is_rejected() -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_patch({})

    assert fields_of(error) == ["body"]


@pytest.mark.parametrize("status", list(Status))
def test_patch_accepts_every_status_and_returns_it_as_the_enum(status: Status) -> None:
    changes = validate_patch({"status": status.value})

    assert changes == {"status": status}
    assert isinstance(changes["status"], Status)


@pytest.mark.parametrize("status", ["DONE", "created", "", None, 1, ["CREATED"]])
def test_patch_with_unknown_status_is_rejected(status: Any) -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_patch({"status": status})

    assert fields_of(error) == ["status"]
    assert "CREATED" in error.value.details[0]["message"]


def test_patch_takes_any_subset_of_the_three_fields() -> None:
    assert validate_patch({"title": "t"}) == {"title": "t"}
    assert validate_patch({"description": ""}) == {"description": ""}
    assert validate_patch({"title": "t", "description": "d", "status": "FINISHED"}) == {
        "title": "t",
        "description": "d",
        "status": Status.FINISHED,
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": " "}, "title"),
        ({"title": "t" * 256}, "title"),
        ({"title": None}, "title"),
        ({"description": "d" * 2001}, "description"),
        ({"description": 1}, "description"),
        ({"id": 3}, "id"),
        ({"version": 2}, "version"),
        ({"title": "ok", "done": True}, "done"),
    ],
)
def test_patch_breaking_a_rule_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_patch(body)

    assert fields_of(error) == [field]


# --- apply_patch --------------------------------------------------------------------------------


def test_patch_that_changes_nothing_returns_none() -> None:
    current = todo(title="buy milk", status=Status.IN_PROGRESS)

    assert apply_patch(current, {"title": "buy milk", "status": Status.IN_PROGRESS}, T1) is None


def test_patch_that_changes_a_field_bumps_the_version_by_one_and_sets_updated_at() -> None:
    current = todo(version=4)

    updated = apply_patch(current, {"status": Status.FINISHED}, T1)

    assert updated == todo(version=5, status=Status.FINISHED, updated_at=T1)
    assert updated is not None and updated.created_at == T0


def test_patch_with_one_changed_field_among_unchanged_ones_is_a_change() -> None:
    updated = apply_patch(todo(), {"title": "buy milk", "description": "2 l"}, T1)

    assert updated is not None
    assert (updated.title, updated.description, updated.version) == ("buy milk", "2 l", 2)


def test_apply_patch_leaves_the_original_todo_unchanged() -> None:
    current = todo()

    apply_patch(current, {"title": "other"}, T1)

    assert current == todo()


# --- time ---------------------------------------------------------------------------------------


def test_time_is_rfc3339_utc_with_milliseconds_and_z() -> None:
    assert format_time(T0) == "2026-11-27T10:00:00.123Z"


def test_time_in_another_zone_is_written_in_utc() -> None:
    moment = datetime(2026, 11, 27, 12, 0, 0, 5000, tzinfo=timezone(timedelta(hours=2)))

    assert format_time(moment) == "2026-11-27T10:00:00.005Z"


def test_time_keeps_milliseconds_and_drops_microseconds() -> None:
    assert format_time(T0.replace(microsecond=999999)) == "2026-11-27T10:00:00.999Z"
    assert format_time(T0.replace(microsecond=0)) == "2026-11-27T10:00:00.000Z"


def test_utc_now_is_utc_and_truncated_to_the_millisecond() -> None:
    now = utc_now()

    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert now.microsecond % 1000 == 0
    assert RFC3339_UTC_MS.match(format_time(now))


def test_parse_time_reads_back_what_format_time_wrote() -> None:
    assert parse_time(format_time(T0)) == T0
    assert parse_time("2026-11-27T12:00:00.123+02:00") == T0


def test_todo_to_dict_is_the_contract_shape_and_from_dict_reads_it_back() -> None:
    current = todo(description="2 l", status=Status.IN_PROGRESS, version=3, updated_at=T1)

    as_dict = current.to_dict()

    assert as_dict == {
        "id": 7,
        "title": "buy milk",
        "description": "2 l",
        "status": "IN_PROGRESS",
        "version": 3,
        "created_at": "2026-11-27T10:00:00.123Z",
        "updated_at": "2026-11-27T10:05:00.123Z",
    }
    assert Todo.from_dict(as_dict) == current
