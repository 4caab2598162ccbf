"""Idempotency-Key on commands (IETF httpapi idempotency-key draft; as Stripe does it).

The key's row is written in the change's own transaction, first: the change and the answer it gave
commit together or not at all. A repeat with the same key and the same request answers the stored
answer (status, headers, body) and changes nothing; the same key with another request answers 422;
while the first still runs (its transaction holds the key's row), 409. Keys are kept
IDEMPOTENCY_TTL_SECONDS (24 h); the relay's tick deletes expired ones. Requests rejected before the
transaction (validation, 415, 413) and failed transactions (404, 412, 503) store nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from todo_cqrs import db
from todo_cqrs.domain.errors import BadRequest, Conflict, IdempotencyKeyReused
from todo_cqrs.settings import settings

MAX_KEY_LENGTH = 255
_LOCK_WAIT_TIMEOUT = 1205
_PURGE_BATCH = 1000


@dataclass(frozen=True)
class Reply:
    """A command's answer, as the client got it and as a repeat with its key gets it again."""

    status: int
    headers: dict[str, str]
    body: bytes


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


# The key's row, taken without waiting: a row another transaction holds means that request is in flight.
_CLAIM = sa.text(
    "SET STATEMENT innodb_lock_wait_timeout = 0 FOR "
    "INSERT INTO idempotency_keys (key_hash, fingerprint, created_at, expires_at) "
    "VALUES (:key_hash, :fingerprint, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3) + INTERVAL :ttl SECOND)"
)
_STORED = sa.text(
    "SELECT fingerprint, status, headers, body, expires_at > UTC_TIMESTAMP(3) AS live "
    "FROM idempotency_keys WHERE key_hash = :key_hash FOR UPDATE NOWAIT"
)
_RENEW = sa.text(
    "UPDATE idempotency_keys SET fingerprint = :fingerprint, status = NULL, headers = NULL, body = NULL, "
    "created_at = UTC_TIMESTAMP(3), expires_at = UTC_TIMESTAMP(3) + INTERVAL :ttl SECOND "
    "WHERE key_hash = :key_hash"
)
_STORE = sa.text(
    "UPDATE idempotency_keys SET status = :status, headers = :headers, body = :body "
    "WHERE key_hash = :key_hash"
)
_PURGE = sa.text(f"DELETE FROM idempotency_keys WHERE expires_at < UTC_TIMESTAMP(3) LIMIT {_PURGE_BATCH}")


def in_flight() -> Conflict:
    """409: another request with the key has not finished."""
    return Conflict("a request with this Idempotency-Key is still being processed; retry shortly")


def reused() -> IdempotencyKeyReused:
    """422: the key was first used with another method, path, body or If-Match."""
    return IdempotencyKeyReused(
        "this Idempotency-Key was used for another request",
        [{"field": "Idempotency-Key", "message": "reused with a different method, path or body"}],
    )


async def claim(conn: AsyncConnection, key: IdempotencyKey) -> Reply | None:
    """Take the key in the caller's transaction; returns the stored reply when this is a repeat.

    Raises Conflict (409) while another request with the key runs, IdempotencyKeyReused (422) when the
    key was used for another request.
    """
    params = {"key_hash": key.key_hash, "fingerprint": key.fingerprint, "ttl": settings().idempotency_ttl_s}
    try:
        await conn.execute(_CLAIM, params)
        return None
    except IntegrityError:
        pass  # the key was used before (and committed): look at what it answered
    except DBAPIError as exc:
        if db.error_code(exc) == _LOCK_WAIT_TIMEOUT:
            raise in_flight() from exc
        raise
    try:
        row = (await conn.execute(_STORED, {"key_hash": key.key_hash})).one()
    except DBAPIError as exc:
        if db.error_code(exc) in db.LOCK_BUSY_CODES:
            raise in_flight() from exc
        raise
    if not row.live:  # expired: the key is free again
        await conn.execute(_RENEW, params)
        return None
    if row.fingerprint != key.fingerprint:
        raise reused()
    if row.status is None:
        raise in_flight()
    return Reply(row.status, orjson.loads(row.headers), row.body.encode())


async def store(conn: AsyncConnection, key: IdempotencyKey, reply: Reply) -> None:
    """Keep the reply under the key, in the transaction of the change it describes."""
    await conn.execute(
        _STORE,
        {
            "key_hash": key.key_hash,
            "status": reply.status,
            "headers": orjson.dumps(reply.headers).decode(),
            "body": reply.body.decode(),
        },
    )


async def purge_expired(budget_s: float = 2.0) -> int:
    """Delete expired keys batch after batch, until one comes back short or the time budget is spent;
    returns how many. A batch takes a few milliseconds, so a tick keeps up with any command rate the
    write DB can take (a minute of 250 keyed commands a second is 15 batches)."""
    deadline = time.monotonic() + budget_s
    deleted = 0
    while True:
        async with db.transaction(db.write_engine(), "write") as conn:
            count = (await conn.execute(_PURGE)).rowcount
        deleted += count
        if count < _PURGE_BATCH or time.monotonic() >= deadline:
            return deleted
