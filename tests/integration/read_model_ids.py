"""Events for read-model-only todos (ids from tests/integration/conftest.py's new_ids fixture)."""

from __future__ import annotations

from typing import Any

CREATED, UPDATED, DELETED = "todo.created.v1", "todo.updated.v1", "todo.deleted.v1"
HIGH_IDS = 10**12
FINAL_VERSION = 10**9  # the tombstone each test leaves: newer than any version a test sends


def todo_data(todo_id: int, version: int, **fields: Any) -> dict[str, Any]:
    """The data of a created/updated event: the whole todo at that version."""
    return {
        "id": todo_id, "title": f"v{version}", "description": "", "status": "CREATED", "version": version,
        "created_at": "2026-11-27T10:00:00.000Z", "updated_at": f"2026-11-27T10:00:{version % 60:02d}.000Z",
        **fields,
    }  # fmt: skip
