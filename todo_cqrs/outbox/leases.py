"""Shard leases: the one holder that may drain a shard of orphaned outbox rows, until its lease runs out.

A lease is a row of `outbox_leases` with an expiry; every operation is one autocommitted statement, so
a holder that freezes, crashes or is cut off holds no lock in the database: its lease just runs out.
Galera-safe: no GET_LOCK, no LOCK TABLES.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from todo_cqrs import db
from todo_cqrs.logs import log_event
from todo_cqrs.settings import Settings

_ACQUIRE = sa.text(
    "INSERT INTO outbox_leases (shard, holder, expires_at) "
    "VALUES (:shard, :holder, UTC_TIMESTAMP(3) + INTERVAL :lease_us MICROSECOND) "
    "ON DUPLICATE KEY UPDATE "
    "holder = IF(holder IS NULL OR expires_at <= UTC_TIMESTAMP(3), VALUES(holder), holder), "
    "expires_at = IF(holder = VALUES(holder), VALUES(expires_at), expires_at)"
)
_RENEW = sa.text(
    "UPDATE outbox_leases SET expires_at = UTC_TIMESTAMP(3) + INTERVAL :lease_us MICROSECOND "
    "WHERE shard = :shard AND holder = :holder AND expires_at > UTC_TIMESTAMP(3)"
)
_RELEASE = sa.text(
    "UPDATE outbox_leases SET holder = NULL, expires_at = UTC_TIMESTAMP(3) "
    "WHERE shard = :shard AND holder = :holder"
)


@dataclass
class Lease:
    """A hold on one shard, until `expires` (monotonic; never later than the database's expiry)."""

    shard: int
    holder: str
    expires: float
    length_s: float

    def remaining(self) -> float:
        return self.expires - time.monotonic()


def outbox_database(s: Settings) -> db.Database:
    """A small autocommitted pool of the write DB for publishing (a process's publisher, the relay):
    a lease or mark statement never leaves a lock behind, and commands never wait behind publishing
    for a connection."""
    return db.Database(
        "write",
        s.write_db_url,
        s.db_timeout_s,
        pool_size=2,
        isolation_level="AUTOCOMMIT",
        skip_autocommit_rollback=True,
        max_overflow=2,
    )


async def execute(database: db.Database, statement: sa.Executable, params: dict[str, Any]) -> Any:
    """One autocommitted statement under the database deadline."""
    async with database.autocommitted() as conn:
        return await conn.execute(statement, params)


async def acquire(database: db.Database, shard: int, length_s: float) -> Lease | None:
    """The shard's lease if it is free or expired; None while another holder's lease runs."""
    holder = f"{os.getpid()}-{secrets.token_hex(8)}"
    sent = time.monotonic()
    result = await execute(
        database, _ACQUIRE, {"shard": shard, "holder": holder, "lease_us": int(length_s * 1e6)}
    )
    return Lease(shard, holder, sent + length_s, length_s) if result.rowcount > 0 else None


async def renew(database: db.Database, lease: Lease) -> bool:
    """Extend the lease by its length; False when it was lost (expired and maybe taken over)."""
    sent = time.monotonic()
    params = {"shard": lease.shard, "holder": lease.holder, "lease_us": int(lease.length_s * 1e6)}
    if (await execute(database, _RENEW, params)).rowcount == 0:
        return False
    lease.expires = sent + lease.length_s
    return True


async def release(database: db.Database, lease: Lease) -> None:
    try:
        await execute(database, _RELEASE, {"shard": lease.shard, "holder": lease.holder})
    except Exception as exc:  # noqa: BLE001 - the lease then simply expires
        log_event("outbox_lease_release_failed", shard=lease.shard, error=repr(exc)[:200])
