"""The event path: apply one todo event to the read model, idempotently, then invalidate the cache."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy.exc import DataError, IntegrityError

from todo_cqrs import metrics, tracing
from todo_cqrs.adapters.cache import todo_cache
from todo_cqrs.adapters.read_store import apply_change, read_connection
from todo_cqrs.domain.clock import parse_time, utc_now
from todo_cqrs.domain.errors import InvalidEvent
from todo_cqrs.domain.events import EVENT_TYPES, read_change
from todo_cqrs.logs import annotate

projection_events = Counter(
    "todo_projection_events",
    "Events project_event answered: applied, skipped (duplicate or stale), rejected (400), failed (5xx)",
    ["outcome", "type"],
)
projection_lag = Histogram(
    "todo_projection_lag_seconds",
    "From an event's ce_time (its commit in the write DB) to its commit in the read model",
    buckets=metrics.LAG_BUCKETS,
)
_OUTCOMES = {
    (outcome, event_type): metrics.child(projection_events, outcome, event_type)
    for outcome in ("applied", "skipped", "rejected", "failed")
    for event_type in (*EVENT_TYPES, "other")
}


def _event_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError:
            return None
    return None


def _count(outcome: str, event_type: str) -> None:
    _OUTCOMES[outcome, event_type if event_type in EVENT_TYPES else "other"].inc()


async def project_event(event_type: str, data: Any, time: Any = None) -> str:
    """Apply the event when its version is newer than the read model's; invalidate either way.
    Returns "applied" or "skipped" (a duplicate or an older version: nothing to do).

    Raises InvalidEvent (never applicable: dead-letter it) or DependencyUnavailable (retry it).
    Duplicates and older versions change nothing in the DB but still invalidate, after the commit.
    """
    try:
        change = read_change(event_type, data)
    except InvalidEvent:
        _count("rejected", event_type)
        raise
    annotate(todo_id=change.todo_id, version=change.version)
    moment = _event_time(time)
    try:
        async with read_connection() as conn:
            applied = await apply_change(conn, change, moment or utc_now())
    except (DataError, IntegrityError) as exc:  # a value the columns refuse: it never will fit
        _count("rejected", event_type)
        raise InvalidEvent(f"the read model refuses this event: {exc.orig}") from exc
    except Exception:
        _count("failed", event_type)
        raise
    context = tracing.current()
    try:
        await todo_cache().invalidate(
            change.todo_id, change.version, context.traceparent if context else None
        )
    except Exception:
        _count("failed", event_type)
        raise
    outcome = "applied" if applied else "skipped"
    _count(outcome, event_type)
    if moment is not None:
        projection_lag.observe(max(0.0, (utc_now() - moment).total_seconds()))
    return outcome
