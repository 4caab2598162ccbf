"""The todo's rules: validation of create and PATCH bodies and of event snapshots, what a change does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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
    is_unicode,
    validate_new,
    validate_patch,
    validate_snapshot,
)

T0 = datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


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


@pytest.mark.parametrize("field", ["title", "description"])
@pytest.mark.parametrize("text", ["\ud800", "a\udfff", "\udbff\udfff\ud800", "tea \ud83c"])
def test_text_holding_a_lone_surrogate_is_rejected_as_not_valid_unicode(field: str, text: str) -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_new({"title": "a", field: text})

    assert fields_of(error) == [field]
    assert "Unicode" in error.value.details[0]["message"]


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("", True),
        ("buy milk", True),
        ("café ☕", True),
        ("\U0001f375", True),
        ("\ud800", False),
        ("x\udc00y", False),
    ],
)
def test_is_unicode_is_false_only_for_a_lone_surrogate(text: str, valid: bool) -> None:
    assert is_unicode(text) is valid


def test_title_of_255_characters_outside_the_bmp_is_accepted() -> None:
    assert validate_new({"title": "\U0001f375" * TITLE_MAX}).title == "\U0001f375" * 255


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
        ({"title": "\ud800"}, "title"),
        ({"description": "\udfff"}, "description"),
        ({"status": "\ud800"}, "status"),
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


def test_patch_never_moves_updated_at_back_when_the_clock_went_back() -> None:
    current = todo(updated_at=T1)

    updated = apply_patch(current, {"status": Status.FINISHED}, T0)

    assert updated is not None and updated.updated_at == T1 and updated.version == 2


def test_apply_patch_leaves_the_original_todo_unchanged() -> None:
    current = todo()

    apply_patch(current, {"title": "other"}, T1)

    assert current == todo()


# --- the todo as a dict -----------------------------------------------------------------------


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


# --- snapshots (an event's whole todo) ----------------------------------------------------------


def test_snapshot_reads_back_as_the_todo() -> None:
    current = todo(description="2 l", version=3, updated_at=T1)

    assert validate_snapshot(current.to_dict()) == current


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        ({"title": "\ud800"}, "title"),
        ({"title": " "}, "title"),
        ({"description": "d" * 2001}, "description"),
        ({"status": "DONE"}, "status"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"updated_at": 1764237600}, "updated_at"),
    ],
)
def test_snapshot_breaking_a_rule_names_the_field(broken: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_snapshot({**todo().to_dict(), **broken})

    assert fields_of(error) == [field]


def test_snapshot_lists_every_missing_field() -> None:
    with pytest.raises(ValidationFailed) as error:
        validate_snapshot({"id": 7, "version": 1})

    assert sorted(fields_of(error)) == ["created_at", "description", "status", "title", "updated_at"]
