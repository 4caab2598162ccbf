"""The small set of domain errors; `todo_cqrs.http` maps each to one HTTP status and body in one place."""

from __future__ import annotations

from typing import Any


class TodoError(Exception):
    """Base of every error a client can be told about."""

    code = "error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class BadRequest(TodoError):
    """The request cannot be read: not JSON, not an object, a path id that is not a positive integer."""

    code = "bad_request"


class ValidationFailed(TodoError):
    """Well-formed input that breaks the rules of the todo (422)."""

    code = "validation_failed"


class NotFound(TodoError):
    code = "not_found"


class MethodNotAllowed(TodoError):
    code = "method_not_allowed"

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(f"method not allowed; use {', '.join(allowed)}")
        self.allowed = allowed


class VersionMismatch(TodoError):
    """`If-Match` named another version than the current one (412)."""

    code = "version_mismatch"


class Conflict(TodoError):
    """A request with this Idempotency-Key is still being processed (409: retry later)."""

    code = "idempotency_key_in_flight"


class IdempotencyKeyReused(ValidationFailed):
    """The Idempotency-Key was used before with another request (422)."""

    code = "idempotency_key_reused"


class PayloadTooLarge(TodoError):
    code = "payload_too_large"


class UnsupportedMediaType(TodoError):
    code = "unsupported_media_type"


class RequestTimeout(TodoError):
    """The client stopped sending its body (408): nothing was read, nothing changed."""

    code = "request_timeout"


class DependencyUnavailable(TodoError):
    """A database, Redis or Kafka the request needs is unreachable (503 with Retry-After)."""

    code = "dependency_unavailable"

    def __init__(self, message: str, cause: BaseException | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry_after_s = retry_after_s


class NotYetConsistent(DependencyUnavailable):
    """The read model did not reach the asked version within the wait bound (503)."""

    code = "not_yet_consistent"


class TooManyWaiters(DependencyUnavailable):
    """MIN_VERSION_MAX_WAITERS ?min_version reads already wait in this process (503 at once)."""

    code = "too_many_waiters"


class Overloaded(DependencyUnavailable):
    """Every read-DB slot of this process is busy and as many reads wait already (503 at once): the
    cache hits keep flowing while the excess is refused."""

    code = "overloaded"


class Unauthenticated(TodoError):
    """An event receiver got no sender identity, or one that does not verify (401, WWW-Authenticate)."""

    code = "unauthenticated"

    def __init__(self, message: str, challenge: str = "Bearer") -> None:
        super().__init__(message)
        self.challenge = challenge


class Forbidden(TodoError):
    """A verified sender that is not this receiver's source (403)."""

    code = "forbidden"


class InvalidEvent(TodoError):
    """An event the projection can never apply (400: to the dead-letter sink, no retry)."""

    code = "invalid_event"
