"""What both databases share: a `todos` or `todos_view` row read back as a Todo."""

from __future__ import annotations

from typing import Any

from todo_cqrs.domain.clock import as_utc
from todo_cqrs.domain.todo import Status, Todo


def todo_from_row(row: Any) -> Todo:
    return Todo(
        id=row.id,
        title=row.title,
        description=row.description,
        status=Status(row.status),
        version=row.version,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )
