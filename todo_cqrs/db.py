"""SQLAlchemy engines for the write and the read database: created lazily, once per process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.settings import settings


def create_engine(url: str, isolation_level: str = "REPEATABLE READ") -> Engine:
    """An engine with bounded connect/read/write timeouts, so a frozen database gives 503, not a hang."""
    s = settings()
    timeout = s.db_timeout_s
    return sa.create_engine(
        url,
        pool_size=s.db_pool_size,
        max_overflow=s.db_pool_size,
        pool_timeout=s.db_timeout_s,
        pool_pre_ping=True,
        pool_recycle=3600,
        isolation_level=isolation_level,
        connect_args={"connect_timeout": timeout, "read_timeout": timeout, "write_timeout": timeout},
    )


@cache
def write_engine() -> Engine:
    # Commands lock the rows they change (SELECT ... FOR UPDATE); READ COMMITTED spares them gap
    # locks, and lets the outbox drain see rows committed meanwhile without ending its transaction.
    return create_engine(settings().write_db_url, isolation_level="READ COMMITTED")


@cache
def read_engine() -> Engine:
    return create_engine(settings().read_db_url)


_DEADLOCK_CODES = {1213, 1205}  # deadlock found; lock wait timeout


def is_deadlock(exc: DBAPIError) -> bool:
    """A transaction lost a lock conflict: its effects were rolled back, running it again is safe."""
    args: tuple[Any, ...] = getattr(exc.orig, "args", ())
    return bool(args) and args[0] in _DEADLOCK_CODES


@contextmanager
def transaction(engine: Engine, what: str) -> Iterator[Connection]:
    """One transaction; a database that is down or frozen becomes DependencyUnavailable (503).
    A deadlock stays a DBAPIError, for the caller to retry."""
    try:
        with engine.begin() as conn:
            yield conn
    except DBAPIError as exc:
        if is_unreachable(exc) and not is_deadlock(exc):
            raise unavailable(what, exc) from exc
        raise
    except PoolTimeout as exc:  # every pooled connection busy for pool_timeout: overloaded, try again
        raise unavailable(what, exc) from exc


def is_unreachable(exc: BaseException) -> bool:
    """True when a database error means the server is down or frozen rather than a bug in a statement."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def unavailable(what: str, exc: BaseException) -> DependencyUnavailable:
    return DependencyUnavailable(f"the {what} database is unreachable", cause=exc)
