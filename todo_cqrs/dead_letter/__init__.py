"""The dead-letter side of the event path: events the KafkaSource could not deliver to project_event.

`store` keeps them (S3-compatible object storage or a local directory), `resend` sends them back after
a fix, and `python -m todo_cqrs.dead_letter` lists and re-sends them from a shell. `resend` is not
imported here, so the sink function needs no HTTP client.
"""

from todo_cqrs.dead_letter.store import (
    DeadLetter,
    DeadLetterStore,
    DirectoryDeadLetterStore,
    S3DeadLetterStore,
    from_settings,
)

__all__ = ["DeadLetter", "DeadLetterStore", "DirectoryDeadLetterStore", "S3DeadLetterStore", "from_settings"]
