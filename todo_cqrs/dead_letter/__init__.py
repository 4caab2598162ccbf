"""The dead-letter side of the event path: events the KafkaSource could not deliver to project_event.

`store` keeps them (S3-compatible object storage or a local directory), `resend` sends them back after
a fix, and `python -m todo_cqrs.dead_letter` lists and re-sends them from a shell. `resend` is not
imported here, so the sink function needs no HTTP client.
"""

from collections.abc import Mapping

from todo_cqrs.dead_letter.store import (
    DeadLetter,
    DeadLetterStore,
    DirectoryDeadLetterStore,
    S3DeadLetterStore,
    from_settings,
)
from todo_cqrs.domain.errors import InvalidEvent
from todo_cqrs.logs import annotate

__all__ = [
    "DeadLetter",
    "DeadLetterStore",
    "DirectoryDeadLetterStore",
    "S3DeadLetterStore",
    "from_settings",
    "keep_dead_letter",
]


def keep_dead_letter(headers: Mapping[str, str], body: bytes) -> str:
    """Store the event exactly as it arrived; returns its key. Raises DependencyUnavailable (retry)."""
    try:
        letter = DeadLetter.from_http(headers, body)
    except ValueError as exc:
        raise InvalidEvent(str(exc)) from exc
    annotate(error_code=letter.error_code, error_dest=letter.error_dest)
    key = from_settings().put(letter)
    annotate(key=key)
    return key
