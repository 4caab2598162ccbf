"""What the reconcile function does on a tick: one pass over every todo, then the outbox's retention.
Its databases and cache are given (todo_cqrs/bootstrap.py); the pass's engines are made in the event loop
of the first tick and closed by `aclose`."""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_cqrs import db
from todo_cqrs.adapters.cache import TodoCache
from todo_cqrs.loop_local import LoopLocal
from todo_cqrs.reconcile.passes import Reconciler
from todo_cqrs.reconcile.retention import prune_published_outbox

# A pass reads whole chunks: its statements may take longer than a request's, not for ever.
SESSION = "SET SESSION max_statement_time = 60, innodb_lock_wait_timeout = 5"
_CONNECT_TIMEOUT_S = 5


def _batch_options(session: str, max_overflow: int) -> dict[str, Any]:
    return {
        "isolation_level": "AUTOCOMMIT",
        "skip_autocommit_rollback": True,
        "max_overflow": max_overflow,
        "pool_timeout": 10,
        "connect_args": {"connect_timeout": _CONNECT_TIMEOUT_S, "client_flag": 0, "init_command": session},
    }


def batch_engine(url: str, session: str = SESSION, max_overflow: int = 4) -> AsyncEngine:
    """A small AUTOCOMMIT pool (each statement its own transaction) without the requests' 2 s limits: a
    pass looks into up to 4 small ranges at once beside its search; the rebuild gives its own session."""
    return db.create_engine(url, _CONNECT_TIMEOUT_S, 2, **_batch_options(session, max_overflow))


def batch_database(what: str, url: str, session: str = SESSION, max_overflow: int = 4) -> db.Database:
    """`batch_engine`'s pool as a Database: its engine made in each event loop on first use."""
    return db.Database(what, url, _CONNECT_TIMEOUT_S, 2, **_batch_options(session, max_overflow))


class ReconcileTick:
    """A pass and a retention round over the write and read databases; repairs invalidate `cache`."""

    def __init__(
        self,
        write: db.Database,
        read: db.Database,
        cache: TodoCache,
        *,
        grace_s: float,
        outbox_retention_h: float,
    ) -> None:
        self.write, self.read, self.cache = write, read, cache
        self.outbox_retention_h = outbox_retention_h
        # One per event loop, as its engines: it keeps, from one pass to the next, the repairs whose
        # invalidation failed.
        self._reconciler = LoopLocal(lambda: Reconciler(write.engine, read.engine, cache, grace_s=grace_s))

    @property
    def reconciler(self) -> Reconciler:
        return self._reconciler()

    async def run(self) -> dict[str, Any]:
        """One pass and one retention round; what they found and did. A database that is down
        raises DependencyUnavailable (503), as a Redis that is down does."""
        try:
            report = await self.reconciler.run_pass()
            pruned = await prune_published_outbox(self.write.engine, self.outbox_retention_h)
        except (DBAPIError, OSError, TimeoutError) as exc:
            if db.is_unreachable(exc):
                raise db.unavailable("write or read", exc) from exc
            raise
        return {**report.as_dict(), "outbox_rows_pruned": pruned}

    async def aclose(self) -> None:
        self._reconciler.forget()
        await self.cache.aclose()
        await self.write.aclose()
        await self.read.aclose()
