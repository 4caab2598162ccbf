"""One JSON line per request or event on stdout, as Knative and any log pipeline expect."""

from __future__ import annotations

import json
import sys
import time
from contextvars import ContextVar
from typing import Any

from todo_cqrs.settings import settings

_fields: ContextVar[dict[str, Any] | None] = ContextVar("log_fields", default=None)


def start_record(**fields: Any) -> dict[str, Any]:
    """Begin the log record of one request; handlers add to it with `annotate`."""
    record = {"function": settings().function_name, **fields}
    _fields.set(record)
    return record


def annotate(**fields: Any) -> None:
    """Add fields (todo_id, event_id, ...) to the current request's log line."""
    record = _fields.get()
    if record is not None:
        record.update(fields)


def write(record: dict[str, Any]) -> None:
    line = json.dumps({"ts": round(time.time(), 3), **record}, default=str, separators=(",", ":"))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def log_event(message: str, **fields: Any) -> None:
    write({"function": settings().function_name, "message": message, **fields})
