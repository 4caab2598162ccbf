"""What the reconcile function does on a tick, built from the settings in one place: one pass over
every todo, then the outbox's retention. Engines and the cache client are made here and closed by
`aclose`; nothing connects before the first tick."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_cqrs import db
from todo_cqrs.adapters.cache import TodoCache, redis_client
from todo_cqrs.reconcile.passes import Reconciler
from todo_cqrs.reconcile.retention import prune_published_outbox
from todo_cqrs.settings import Settings

# A pass reads whole chunks: its statements may take longer than a request's, not for ever.
SESSION = "SET SESSION max_statement_time = 60, innodb_lock_wait_timeout = 5"


def batch_engine(url: str, session: str = SESSION, max_overflow: int = 4) -> AsyncEngine:
    """A small AUTOCOMMIT pool (each statement its own transaction) without the requests' 2 s limits: a
    pass looks into up to 4 small ranges at once beside its search; the rebuild gives its own session."""
    return db.create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        skip_autocommit_rollback=True,
        pool_size=2,
        max_overflow=max_overflow,
        pool_timeout=10,
        connect_args={"connect_timeout": 5, "client_flag": 0, "init_command": session},
    )


@dataclass
class ReconcileTick:
    reconciler: Reconciler
    write: AsyncEngine
    read: AsyncEngine
    cache: TodoCache
    outbox_retention_h: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ReconcileTick:
        write, read = batch_engine(settings.write_db_url), batch_engine(settings.read_db_url)
        cache = TodoCache(redis_client(settings.redis_url, settings.redis_timeout_s))
        reconciler = Reconciler(write, read, cache, grace_s=settings.reconcile_grace_s)
        return cls(reconciler, write, read, cache, settings.outbox_retention_h)

    async def run(self) -> dict[str, Any]:
        """One pass and one retention round; what they found and did. A database that is down
        raises DependencyUnavailable (503), as a Redis that is down does."""
        try:
            report = await self.reconciler.run_pass()
            pruned = await prune_published_outbox(self.write, self.outbox_retention_h)
        except (DBAPIError, OSError, TimeoutError) as exc:
            if db.is_unreachable(exc):
                raise db.unavailable("write or read", exc) from exc
            raise
        return {**report.as_dict(), "outbox_rows_pruned": pruned}

    async def aclose(self) -> None:
        await self.cache.aclose()
        await self.write.dispose()
        await self.read.dispose()
