"""The dead-letter side of the event path: events the KafkaSource could not deliver to project_event.

`store` keeps them (S3-compatible object storage or a local directory), `resend` sends them back after
a fix, and `python -m todo_cqrs.dead_letter` lists and re-sends them from a shell. `resend` is not
imported here, so the sink function needs no HTTP client.
"""

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import Counter

from todo_cqrs.dead_letter.store import (
    DeadLetter,
    DeadLetterStore,
    DirectoryDeadLetterStore,
    S3DeadLetterStore,
    from_settings,
    store_from,
)
from todo_cqrs.domain.errors import InvalidEvent
from todo_cqrs.logs import annotate

dead_letters_stored = Counter("todo_dead_letters_stored", "Dead letters kept by the dead_letter function")

__all__ = [
    "DeadLetter",
    "DeadLetterStore",
    "DeadLetters",
    "DirectoryDeadLetterStore",
    "S3DeadLetterStore",
    "from_settings",
    "keep_dead_letter",
    "store_from",
]


@dataclass
class DeadLetters:
    """What the dead_letter sink uses: the store that keeps the letters (tests/contract holds the
    in-memory fake to the directory and S3 stores' behaviour)."""

    store: DeadLetterStore

    async def aclose(self) -> None:
        """Nothing to close: the stores are blocking clients, with no connection of an event loop."""


async def keep_dead_letter(d: DeadLetters, headers: Mapping[str, str], body: bytes) -> str:
    """Store the event exactly as it arrived; returns its key. Raises DependencyUnavailable (retry).
    The stores are blocking clients (boto3, files): they run in a worker thread."""
    try:
        letter = DeadLetter.from_http(headers, body)
    except ValueError as exc:
        raise InvalidEvent(str(exc)) from exc
    annotate(error_code=letter.error_code, error_dest=letter.error_dest)
    key = await asyncio.to_thread(d.store.put, letter)
    dead_letters_stored.inc()
    annotate(key=key)
    return key
