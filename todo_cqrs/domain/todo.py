"""The todo and its rules: validation of commands and what a change does. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from todo_cqrs.domain.clock import format_time, parse_time
from todo_cqrs.domain.errors import ValidationFailed

TITLE_MAX = 255
DESCRIPTION_MAX = 2000
CREATE_FIELDS = ("title", "description")
PATCH_FIELDS = ("title", "description", "status")


class Status(StrEnum):
    CREATED = "CREATED"
    IN_PROGRESS = "IN_PROGRESS"
    FINISHED = "FINISHED"
    CANCELED = "CANCELED"


@dataclass(frozen=True)
class Todo:
    id: int
    title: str
    description: str
    status: Status
    version: int
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "status": self.status.value,
            "version": self.version,
            "created_at": format_time(self.created_at),
            "updated_at": format_time(self.updated_at),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Todo:
        return cls(
            id=int(data["id"]),
            title=str(data["title"]),
            description=str(data.get("description", "")),
            status=Status(data["status"]),
            version=int(data["version"]),
            created_at=parse_time(data["created_at"]),
            updated_at=parse_time(data["updated_at"]),
        )


@dataclass(frozen=True)
class NewTodo:
    title: str
    description: str

    def created(self, todo_id: int, now: datetime) -> Todo:
        return Todo(todo_id, self.title, self.description, Status.CREATED, 1, now, now)


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON's "\\ud800"), which no database can store."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def _check_unknown(body: dict[str, Any], allowed: tuple[str, ...]) -> list[dict[str, str]]:
    return [_problem(k, f"unknown field; allowed: {', '.join(allowed)}") for k in body if k not in allowed]


def _check_text(body: dict[str, Any], field: str, limit: int, *, blank_ok: bool) -> list[dict[str, str]]:
    value = body[field]
    if not isinstance(value, str):
        return [_problem(field, "must be a string")]
    if not is_unicode(value):
        return [_problem(field, "must be valid Unicode (it holds a lone surrogate)")]
    if len(value) > limit:
        return [_problem(field, f"must be at most {limit} characters")]
    if not blank_ok and not value.strip():
        return [_problem(field, "must contain at least one non-space character")]
    return []


def _check_status(body: dict[str, Any]) -> list[dict[str, str]]:
    value = body["status"]
    if not isinstance(value, str) or value not in Status.__members__:
        return [_problem("status", f"must be one of {', '.join(Status)}")]
    return []


def validate_new(body: dict[str, Any]) -> NewTodo:
    """The create command's body, checked; raises ValidationFailed listing every field problem."""
    problems = _check_unknown(body, CREATE_FIELDS)
    if "title" not in body:
        problems.append(_problem("title", "is required"))
    else:
        problems += _check_text(body, "title", TITLE_MAX, blank_ok=False)
    if "description" in body:
        problems += _check_text(body, "description", DESCRIPTION_MAX, blank_ok=True)
    if problems:
        raise ValidationFailed("the todo is not valid", problems)
    return NewTodo(body["title"], body.get("description", ""))


def validate_patch(body: dict[str, Any]) -> dict[str, Any]:
    """The update command's changes, checked: a non-empty subset of title, description, status."""
    if not body:
        raise ValidationFailed(
            "a PATCH needs at least one of: title, description, status",
            [_problem("body", "is empty")],
        )
    problems = _check_unknown(body, PATCH_FIELDS)
    if "title" in body:
        problems += _check_text(body, "title", TITLE_MAX, blank_ok=False)
    if "description" in body:
        problems += _check_text(body, "description", DESCRIPTION_MAX, blank_ok=True)
    if "status" in body:
        problems += _check_status(body)
    if problems:
        raise ValidationFailed("the change is not valid", problems)
    return {k: Status(v) if k == "status" else v for k, v in body.items()}


def validate_snapshot(data: dict[str, Any]) -> Todo:
    """A whole todo as an event carries it (id and version checked by the caller), by the same rules."""
    problems = [
        _problem(f, "is required") for f in (*PATCH_FIELDS, "created_at", "updated_at") if f not in data
    ]
    if not problems:
        problems += _check_text(data, "title", TITLE_MAX, blank_ok=False)
        problems += _check_text(data, "description", DESCRIPTION_MAX, blank_ok=True)
        problems += _check_status(data)
        for field in ("created_at", "updated_at"):
            try:
                parse_time(data[field])
            except (TypeError, ValueError, AttributeError):
                problems.append(_problem(field, "must be an RFC 3339 time"))
    if problems:
        raise ValidationFailed("not a whole todo", problems)
    return Todo.from_dict(data)


def apply_patch(todo: Todo, changes: dict[str, Any], now: datetime) -> Todo | None:
    """The todo after the changes, one version later; None when nothing would change.

    `updated_at` never goes back, even if the clock that gave `now` did.
    """
    if all(getattr(todo, field) == value for field, value in changes.items()):
        return None
    return replace(todo, **changes, version=todo.version + 1, updated_at=max(now, todo.updated_at))
