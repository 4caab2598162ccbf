"""The event path: apply one todo event to the read model, idempotently, then invalidate the cache.

`project_event` takes the projection's dependencies (`Projection`, built by todo_cqrs/bootstrap.py, or
fakes in the unit tests) and the event's values; it returns an outcome or raises a domain error."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import Counter, Histogram
from sqlalchemy.exc import DataError, IntegrityError

from todo_cqrs import metrics, tracing
from todo_cqrs.domain.clock import parse_time, utc_now
from todo_cqrs.domain.errors import InvalidEvent
from todo_cqrs.domain.events import EVENT_TYPES, Change, check_subject, read_change
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


class ReadModelWriter(Protocol):
    """The read model as the projection writes it (todo_cqrs.adapters.read_store.ReadStore): version-gated
    upserts; a value the columns refuse raises DataError or IntegrityError."""

    async def apply(self, change: Change, event_time: datetime) -> bool: ...

    async def apply_all(self, changes: list[tuple[Change, datetime]]) -> list[bool]: ...


class Invalidator(Protocol):
    """The cache's invalidations (todo_cqrs.adapters.cache.TodoCache); Redis down: DependencyUnavailable."""

    async def invalidate_many(self, changes: list[tuple[int, int, str | None]]) -> None: ...


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


async def project_event(
    p: Projection, event_type: str, data: Any, time: Any = None, subject: Any = None
) -> str:
    """Apply the event when its version is newer than the read model's; invalidate either way.
    Returns "applied" or "skipped" (a duplicate or an older version: nothing to do).

    Raises InvalidEvent (never applicable: dead-letter it; also when `subject` names another todo than
    data.id) or DependencyUnavailable (retry it).
    Duplicates and older versions change nothing in the DB but still invalidate, after the commit.
    Events that arrive together (a KafkaSource with ordering `unordered` keeps many in flight) are
    applied together: one upsert and one Redis round trip for all (`Projector`).
    """
    try:
        check_subject(subject, data)
        change = read_change(event_type, data)
    except InvalidEvent:
        _count("rejected", event_type)
        raise
    annotate(todo_id=change.todo_id, version=change.version)
    moment = _event_time(time)
    context = tracing.current()
    try:
        applied = await p.projector.apply(
            change, moment or utc_now(), context.traceparent if context else None
        )
    except InvalidEvent:
        _count("rejected", event_type)
        raise
    except Exception:
        _count("failed", event_type)
        raise
    outcome = "applied" if applied else "skipped"
    _count(outcome, event_type)
    if moment is not None:
        projection_lag.observe(max(0.0, (utc_now() - moment).total_seconds()))
    return outcome


@dataclass
class _Arrived:
    change: Change
    moment: datetime
    traceparent: str | None
    done: asyncio.Future[bool]


class Projector:
    """Applies the events handed to it while the previous group was being applied as one group: one
    upsert for all (each row still version-gated, in arrival order) and one Redis round trip for their
    invalidations, after the commit. One event alone goes through as it arrives."""

    def __init__(self, store: ReadModelWriter, cache: Invalidator) -> None:
        self._store = store
        self._cache = cache
        self._waiting: list[_Arrived] = []
        self._task: asyncio.Task[None] | None = None

    async def apply(self, change: Change, moment: datetime, traceparent: str | None) -> bool:
        """True when the event changed the read model; raises what applying its group raised."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._waiting.append(_Arrived(change, moment, traceparent, done))
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._apply_waiting())
        return await done

    async def aclose(self) -> None:
        if self._task is not None and self._task.get_loop() is asyncio.get_running_loop():
            await asyncio.wait([self._task])

    async def _apply_waiting(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            try:
                applied = await self._apply_group(group)
            except BaseException as exc:  # noqa: BLE001 - each event's request answers it
                for arrived in group:
                    if not arrived.done.done():
                        arrived.done.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for arrived, outcome in zip(group, applied, strict=True):
                if arrived.done.done():
                    continue
                if isinstance(outcome, InvalidEvent):
                    arrived.done.set_exception(outcome)
                else:
                    arrived.done.set_result(outcome)

    async def _apply_group(self, group: list[_Arrived]) -> list[bool | InvalidEvent]:
        """Per event: whether it changed the read model, or why it never will."""
        try:
            if len(group) == 1:
                applied = [await self._store.apply(group[0].change, group[0].moment)]
            else:
                applied = await self._store.apply_all([(a.change, a.moment) for a in group])
        except (DataError, IntegrityError) as exc:  # a value the columns refuse: it never will fit
            if len(group) == 1:
                return [InvalidEvent(f"the read model refuses this event: {exc.orig}")]
            results: list[bool | InvalidEvent] = []
            for arrived in group:  # find the one, apply the others
                results += await self._apply_group([arrived])
            return results
        await self._cache.invalidate_many(
            [(a.change.todo_id, a.change.version, a.traceparent) for a in group]
        )
        return list(applied)


@dataclass
class Projection:
    """What the projection uses: the read model's writes and the cache's invalidations, and the
    `Projector` that groups the events arriving together."""

    store: ReadModelWriter
    cache: Invalidator
    projector: Projector = field(init=False)

    def __post_init__(self) -> None:
        self.projector = Projector(self.store, self.cache)

    async def aclose(self) -> None:
        """Let the group being applied finish, then close the adapters' connections of this loop."""
        await self.projector.aclose()
        for adapter in (self.cache, self.store):
            closer = getattr(adapter, "aclose", None)
            if closer is not None:
                await closer()
