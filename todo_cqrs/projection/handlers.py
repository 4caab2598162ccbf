"""The event path: apply one todo event to the read model, idempotently, then invalidate the cache."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from todo_cqrs.adapters.cache import todo_cache
from todo_cqrs.adapters.read_store import apply_change, read_connection
from todo_cqrs.domain.events import Change, read_change
from todo_cqrs.domain.todo import parse_time, utc_now
from todo_cqrs.logs import annotate


def _event_time(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError:
            pass
    return utc_now()


def project_event(event_type: str, data: Any, time: Any = None) -> Change:
    """Apply the event when its version is newer than the read model's; invalidate either way.

    Raises InvalidEvent (never applicable: dead-letter it) or DependencyUnavailable (retry it).
    Duplicates and older versions change nothing in the DB but still invalidate, after the commit.
    """
    change = read_change(event_type, data)
    annotate(todo_id=change.todo_id, version=change.version)
    with read_connection() as conn:
        apply_change(conn, change, _event_time(time))
    todo_cache().invalidate(change.todo_id, change.version)
    return change
