"""What both databases share: a `todos` or `todos_view` row read back as a Todo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from todo_cqrs.domain.clock import as_utc
from todo_cqrs.domain.todo import Status, Todo


def todo_from_row(row: Sequence[Any]) -> Todo:
    """A row whose first columns are both tables' own: id, title, description, status, version,
    created_at, updated_at (a driver's tuple or an SQLAlchemy row alike)."""
    todo_id, title, description, status, version, created_at, updated_at = row[:7]
    return Todo(todo_id, title, description, Status(status), version, as_utc(created_at), as_utc(updated_at))
