"""What a command needs of its storage and its publisher, as the handlers see them.

A command runs in one unit of work: one write transaction that takes its Idempotency-Key, reads and
changes todos, collects the events of those changes, and keeps the outcome under the key. The store
appends the collected events to the outbox in the same transaction, and hands them back after the
commit, for the publisher. `todo_cqrs/adapters/write_store.py` is the MariaDB store;
`tests/unit/fakes.py` has the in-memory one, and tests/contract holds both to the same cases.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Protocol, TypeVar

from todo_cqrs.adapters.publisher import OutboxRecord
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.domain.events import TodoEvent
from todo_cqrs.domain.todo import NewTodo, Todo
from todo_cqrs.tracing import TraceContext

T = TypeVar("T")


class Outcome(IntEnum):
    """What a command came to (kept under its Idempotency-Key by value)."""

    CREATED = 1
    UPDATED = 2  # also a PATCH that changed nothing: the todo as it is
    DELETED = 3


@dataclass(frozen=True)
class Stored:
    """The outcome a key's first request came to, and its todo: a repeat is answered with them."""

    outcome: Outcome
    todo: Todo


@dataclass(frozen=True)
class Locked:
    """A todo row-locked until commit, and the database's clock."""

    todo: Todo
    now: datetime


@dataclass(frozen=True)
class ToPublish:
    """An outbox row just committed, and the pending row of its todo it must follow onto Kafka (None:
    every older event of the todo is there already)."""

    record: OutboxRecord
    after: int | None


class UnitOfWork(Protocol):
    async def claim(self, key: IdempotencyKey) -> Stored | None:
        """Take the key; the stored outcome when this is a repeat. Raises Conflict (409) while another
        request with the key runs, IdempotencyKeyReused (422) when it was used for another request."""

    async def keep(self, key: IdempotencyKey, outcome: Outcome, todo: Todo) -> None:
        """Keep the outcome under the key, with the change it describes."""

    async def insert(self, new: NewTodo) -> Todo:
        """Insert a todo at version 1, stamped with the database's clock."""

    async def lock(self, todo_id: int) -> Locked | None:
        """The todo, row-locked until commit (so concurrent commands on it run one after another and its
        versions never skip or repeat); None when there is none."""

    async def save(self, todo: Todo) -> None: ...

    async def delete(self, todo_id: int) -> None: ...

    def add_event(self, event: TodoEvent) -> None:
        """Collect the event of a change; it is appended to the outbox at the end of the unit."""


class WriteStore(Protocol):
    async def run(
        self, work: Callable[[UnitOfWork], Awaitable[T]], trace: TraceContext | None
    ) -> tuple[T, list[ToPublish]]:
        """`work` in one transaction with its events appended, again on a deadlock; the events come
        back once committed. DependencyUnavailable (503) when the database is unreachable."""

    async def purge_expired_keys(self, budget_s: float = 2.0) -> int: ...

    async def aclose(self) -> None: ...


class Publisher(Protocol):
    def committed(self, record: OutboxRecord, after: int | None) -> None:
        """Put a committed outbox row on Kafka, after the row it must follow."""

    def warm_up(self) -> None:
        """Connect to Kafka ahead of the first commit, in the background (a health probe asks)."""

    async def aclose(self) -> None:
        """Publish what is left (bounded), then close."""
