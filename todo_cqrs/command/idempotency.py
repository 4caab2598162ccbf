"""Idempotency-Key on commands (IETF httpapi idempotency-key draft; as Stripe does it).

The key's row is written in the change's own transaction, first (the unit of work's `claim`): the
change and its outcome commit together or not at all. A repeat with the same key and the same request
gets the stored outcome and todo, rendered exactly as the first time, and changes nothing; the same key
with another request answers 422; while the first still runs (its transaction holds the key's row),
409. Keys are kept IDEMPOTENCY_TTL_SECONDS (24 h); the relay's tick deletes expired ones. Requests
rejected before the transaction (validation, 415, 413) and failed transactions (404, 412, 503) store
nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from todo_cqrs.domain.errors import BadRequest, Conflict, IdempotencyKeyReused

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class IdempotencyKey:
    key_hash: str  # sha256 hex digests: aiomysql cannot send bytes with PyMySQL 1.2
    fingerprint: str  # of the request: method, target, body, If-Match

    @classmethod
    def of(cls, key: str | None, request: str, body: object, if_match: str | None) -> IdempotencyKey | None:
        """The key of a request, None without the header; BadRequest when it is empty or too long."""
        if key is None:
            return None
        if not key or len(key) > MAX_KEY_LENGTH:
            raise BadRequest(f"Idempotency-Key must have 1 to {MAX_KEY_LENGTH} characters")
        # The standard library's encoder: it takes what the body may hold before validation refuses it
        # (lone surrogates, integers past 64 bits), escaped to ASCII.
        canonical = json.dumps([request, body, if_match], sort_keys=True, separators=(",", ":"))
        key_text = key.encode("utf-8", "surrogateescape")
        return cls(hashlib.sha256(key_text).hexdigest(), hashlib.sha256(canonical.encode()).hexdigest())


def in_flight() -> Conflict:
    """409: another request with the key has not finished."""
    return Conflict("a request with this Idempotency-Key is still being processed; retry shortly")


def reused() -> IdempotencyKeyReused:
    """422: the key was first used with another method, path, body or If-Match."""
    return IdempotencyKeyReused(
        "this Idempotency-Key was used for another request",
        [{"field": "Idempotency-Key", "message": "reused with a different method, path or body"}],
    )
