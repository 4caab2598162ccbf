"""The write and the read database as the functions use them: `Database`, an SQLAlchemy asyncio engine per
event loop (made on first use), its transactions under a deadline, and `Statements`: the hot statements
(a command's unit of work, the projection's upserts) sent on the pooled driver connection itself.

The driver is aiomysql (PyMySQL's protocol code under an asyncio transport). aiomysql has no read or
write timeout of its own, so every transaction runs under an asyncio deadline instead (twice
DB_TIMEOUT_SECONDS): a frozen database costs that and a 503, and the connection cut off is discarded.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import pymysql
import sqlalchemy.ext.asyncio
from aiomysql import Connection as DriverConnection
from aiomysql import Cursor
from pymysql.constants import CLIENT
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from todo_cqrs import tracing
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.loop_local import LoopLocal
from todo_cqrs.settings import Settings

T = TypeVar("T")

_DEADLOCK_CODES = {1213, 1205}  # deadlock found (or a Galera certification conflict); lock wait timeout
LOCK_BUSY_CODES = {1205, 3572}  # a NOWAIT lock that another transaction holds (MariaDB, MySQL)
DEADLOCK_RETRIES = 3


def driver_url(url: str, driver: str) -> URL:
    """The URL with the given MySQL driver (aiomysql for the functions, pymysql for Alembic)."""
    parsed = make_url(url)
    return parsed.set(drivername=f"mysql+{driver}") if parsed.get_backend_name() == "mysql" else parsed


def create_engine(
    url: str, timeout_s: float, pool_size: int, isolation_level: str = "REPEATABLE READ", **overrides: Any
) -> AsyncEngine:
    """An async engine whose pool is bounded, so an overloaded process answers 503 instead of queueing.

    The server gives up on its side too, once the client has: a row lock is waited for at most
    `timeout_s` (rounded up), a statement runs at most twice that.
    """
    lock_wait_s = max(1, math.ceil(timeout_s))
    session = f"SET SESSION innodb_lock_wait_timeout = {lock_wait_s}, max_statement_time = {2 * lock_wait_s}"
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": pool_size,
        "pool_timeout": timeout_s,
        # No ping before every checkout (a round trip per transaction): a connection found dead fails
        # its request with a 503, and SQLAlchemy then discards every pooled connection as old as it,
        # so after a database restart one request per process is refused, not one per connection.
        "pool_pre_ping": False,
        # Every use ends its transaction itself (commit or rollback, or autocommit): the pool's own
        # ROLLBACK when a connection comes back would be one more round trip per transaction. A
        # connection cut off mid-transaction (a deadline) is discarded, not returned.
        "pool_reset_on_return": None,
        "pool_recycle": 3600,
        "isolation_level": isolation_level,
        # Affected rows, not found rows: an upsert then says whether it changed anything (0, 1 or 2).
        # Multi-statements: a transaction's statements whose outcome nobody waits for go to the server
        # with the next one, in one round trip (Statements.defer).
        "connect_args": {
            "connect_timeout": lock_wait_s,
            "client_flag": CLIENT.MULTI_STATEMENTS,
            "init_command": session,
        },
    }
    options.update(overrides)
    tracing.instrument_sqlalchemy()
    # Looked up at call time: the SQLAlchemy instrumentation, when on, wraps the module's function.
    return sqlalchemy.ext.asyncio.create_async_engine(driver_url(url, "aiomysql"), **options)


class Database:
    """One database: its engine in the running event loop (made on first use, so nothing connects at
    import), what to call it in errors ("write", "read"), and the deadline of its transactions."""

    def __init__(self, what: str, url: str, timeout_s: float, pool_size: int, **engine_options: Any) -> None:
        self.what = what
        self.timeout_s = timeout_s
        self._engine = LoopLocal(lambda: create_engine(url, timeout_s, pool_size, **engine_options))

    @classmethod
    def write(cls, s: Settings, **overrides: Any) -> Database:
        """The write DB: commands lock the rows they change (SELECT ... FOR UPDATE); READ COMMITTED spares
        them gap locks, and lets the outbox drain see rows committed meanwhile."""
        options = {"pool_size": s.db_pool_size, "isolation_level": "READ COMMITTED", **overrides}
        return cls("write", s.write_db_url, s.db_timeout_s, **options)

    @classmethod
    def read(cls, s: Settings, **overrides: Any) -> Database:
        """The read DB: every use is one statement (a read, or the projection's upsert), autocommitted, with
        no COMMIT or ROLLBACK round trips around it."""
        options = {"pool_size": s.db_pool_size, "isolation_level": "AUTOCOMMIT", **overrides}
        return cls("read", s.read_db_url, s.db_timeout_s, skip_autocommit_rollback=True, **options)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine()

    @property
    def deadline_s(self) -> float:
        """How long one transaction may take: twice the timeout (a connection, then its statements), so a
        frozen database answers 503 within about 2 s, and a busy one is not cut off at the first slow
        statement."""
        return 2 * self.timeout_s

    def transaction(self, timeout_s: float | None = None) -> AbstractAsyncContextManager[AsyncConnection]:
        return transaction(self.engine, self.what, self.deadline_s if timeout_s is None else timeout_s)

    def autocommitted(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return autocommitted(self.engine, self.what, self.deadline_s)

    async def run_statements(self, work: Callable[[Statements], Awaitable[T]]) -> T:
        """`await work(statements)` in one transaction on a pooled driver connection, again on a deadlock
        (its effects were rolled back); the deadline and the COMMIT as in `transaction`."""
        for attempt in itertools.count():
            try:
                async with self._driver_statements(in_transaction=True) as statements:
                    return await work(statements)
            except pymysql.err.OperationalError as exc:  # a deadlock: every other one is unreachable
                if attempt >= DEADLOCK_RETRIES:
                    raise unavailable(self.what, exc) from exc
        raise AssertionError("unreachable")

    def autocommitted_statements(self) -> AbstractAsyncContextManager[Statements]:
        """Statements on a pooled driver connection of an AUTOCOMMIT database (each its own transaction,
        no COMMIT round trip), under the deadline; an unreachable database raises DependencyUnavailable."""
        return self._driver_statements(in_transaction=False)

    @asynccontextmanager
    async def _driver_statements(self, in_transaction: bool) -> AsyncIterator[Statements]:
        deadline = asyncio.get_running_loop().time() + self.deadline_s
        try:
            async with asyncio.timeout_at(deadline):
                pooled = await self.engine.raw_connection()
        except (DBAPIError, PoolTimeout, TimeoutError, OSError, pymysql.err.MySQLError) as exc:
            raise unavailable(self.what, exc) from exc
        conn: DriverConnection = pooled.driver_connection
        try:
            statements = Statements(conn)
            async with asyncio.timeout_at(deadline):
                yield statements
                if not in_transaction:
                    await statements.flush()
            if in_transaction:
                await _commit_to_its_end(statements.commit())
        except BaseException as exc:
            await _end_failed_driver(pooled, conn, exc, self.deadline_s, rollback=in_transaction)
            if is_unreachable(exc):
                raise unavailable(self.what, exc) from exc
            raise
        await greenlet_spawn(pooled.close)  # back to the pool

    async def aclose(self) -> None:
        """Close this loop's engine, if one was made."""
        engine = self._engine.peek()
        if engine is not None:
            self._engine.forget()
            await engine.dispose()


@dataclass
class Deferred:
    """A statement sent with the next one (Statements.defer); what it came to, once that one is read."""

    sql: str  # rendered: its parameters are escaped in
    rows: tuple[Any, ...] = ()
    lastrowid: int | None = None

    async def read(self, cursor: Cursor) -> None:
        self.rows = tuple(await cursor.fetchall())
        self.lastrowid = cursor.lastrowid


class Statements:
    """The statements of one transaction, sent on the driver's connection as SQL text with pyformat
    parameters (`%(name)s`). The commands' hot path runs here: SQLAlchemy's execution layer (a greenlet
    switch, a compiled-cache lookup and result processing per statement) cost half of a create's CPU
    in its process, and its tables stay the schema's one source (write_store.py). When tracing is on,
    each statement is a client span, as SQLAlchemy's instrumentation makes them.

    A statement whose outcome the transaction does not wait for (an UPDATE of a row it holds, its outbox
    INSERT) is deferred: it goes to the server ahead of the next statement, or of the COMMIT, in the same
    round trip (a multi-statement query: the server runs them in order and stops at the first error,
    which is raised by the statement that carried them). A PATCH takes two round trips instead of five."""

    def __init__(self, conn: DriverConnection) -> None:
        self._conn = conn
        self._deferred: list[Deferred] = []

    def defer(self, sql: str, params: Any = None) -> Deferred:
        """Send the statement with the next one; its outcome is in the returned Deferred after that."""
        deferred = Deferred(self._render(sql, params))
        self._deferred.append(deferred)
        return deferred

    async def execute(self, sql: str, params: Any = None) -> Cursor:
        cursor: Cursor = await self._conn.cursor()
        if not self._deferred:
            with _statement_span(sql):
                await cursor.execute(sql, params)
            return cursor
        await self._send_deferred(cursor, self._render(sql, params))
        return cursor

    async def execute_many(self, sql: str, rows: Sequence[Any]) -> Cursor:
        """One statement for many parameter sets (an INSERT ... VALUES becomes one multi-row INSERT)."""
        await self.flush()
        cursor: Cursor = await self._conn.cursor()
        with _statement_span(sql):
            await cursor.executemany(sql, rows)
        return cursor

    async def one(self, sql: str, params: Any = None) -> Any:
        """The first row of a statement's result (a tuple), None when it has none."""
        return await (await self.execute(sql, params)).fetchone()

    async def flush(self) -> None:
        """Send what is deferred now."""
        if self._deferred:
            last = self._deferred.pop()
            await last.read(await self.execute(last.sql))

    async def commit(self) -> None:
        """COMMIT, with what is deferred ahead of it in the same round trip."""
        if self._deferred:
            await self._send_deferred(await self._conn.cursor(), "COMMIT")
        else:
            await self._conn.commit()

    async def _send_deferred(self, cursor: Cursor, last: str) -> None:
        """The deferred statements and `last` in one round trip; the cursor is left on `last`'s result."""
        deferred, self._deferred = self._deferred, []
        with _statement_span(last, *(d.sql for d in deferred)):
            await cursor.execute(";\n".join([*(d.sql for d in deferred), last]))
            for sent in deferred:
                await sent.read(cursor)
                await cursor.nextset()

    def _render(self, sql: str, params: Any) -> str:
        """The statement with its parameters escaped in, as the driver renders it."""
        if params is None:
            return sql
        literal = self._conn.literal
        if isinstance(params, dict):
            return sql % {name: literal(value) for name, value in params.items()}
        return sql % tuple(literal(value) for value in params)


async def _commit_to_its_end(commit: Coroutine[Any, Any, None]) -> None:
    """The COMMIT, whatever the deadline or a cancellation: one cut off would leave the caller not
    knowing whether its change was written. A cancellation is raised once the COMMIT is over."""
    task = asyncio.get_running_loop().create_task(commit)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _statement_span(sql: str, *sent_before: str) -> AbstractContextManager[Any]:
    """A client span for the statement when tracing is on (as SQLAlchemy's instrumentation makes), with
    the deferred statements that went in its round trip."""
    if not tracing.enabled():
        return nullcontext()
    text = ";\n".join([*sent_before, sql])
    return tracing.span(sql.split(None, 1)[0], **{"db.system": "mariadb", "db.statement": text})


def _cut_off(exc: BaseException) -> bool:
    """A failure that may have left a statement half sent or half read: a deadline, a cancellation, the
    socket, or a client-side error of the driver (2000 and up: server gone, connection lost)."""
    if isinstance(exc, pymysql.err.OperationalError):
        return (error_code(exc) or 0) >= 2000
    return isinstance(exc, TimeoutError | asyncio.CancelledError | OSError | pymysql.err.InterfaceError)


async def _end_failed_driver(
    pooled: PoolProxiedConnection,
    conn: DriverConnection,
    exc: BaseException,
    deadline_s: float,
    rollback: bool,
) -> None:
    """Give the connection of a failed use back (rolled back first, when in a transaction); one cut off
    mid-statement (a deadline, a cancellation), or that cannot even roll back, is closed and discarded
    instead, since the state of its session is unknown."""
    if not _cut_off(exc):
        try:
            if rollback:
                async with asyncio.timeout(deadline_s):
                    await conn.rollback()
            await greenlet_spawn(pooled.close)
            return
        except Exception:  # noqa: BLE001 - discarded below
            pass
    conn.close()  # the socket, at once: no goodbye to a server that may be frozen
    await greenlet_spawn(pooled.invalidate)


def error_code(exc: BaseException) -> int | None:
    """The server's error number (1062 duplicate key, 1213 deadlock, ...), of a driver's error or of
    SQLAlchemy's wrapper of one."""
    args: tuple[Any, ...] = getattr(getattr(exc, "orig", exc), "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def is_deadlock(exc: BaseException) -> bool:
    """A transaction lost a lock conflict: its effects were rolled back, running it again is safe."""
    return isinstance(exc, DBAPIError | pymysql.err.OperationalError) and error_code(exc) in _DEADLOCK_CODES


def is_unreachable(exc: BaseException) -> bool:
    """True when a database error means the server is down or frozen rather than a bug in a statement."""
    if is_deadlock(exc):
        return False
    unreachable = (OperationalError, InterfaceError, PoolTimeout, TimeoutError, OSError)
    if isinstance(exc, unreachable + (pymysql.err.OperationalError, pymysql.err.InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def unavailable(what: str, exc: BaseException) -> DependencyUnavailable:
    return DependencyUnavailable(f"the {what} database is unreachable", cause=exc)


@asynccontextmanager
async def transaction(engine: AsyncEngine, what: str, deadline_s: float) -> AsyncIterator[AsyncConnection]:
    """One transaction; a database that is down or frozen becomes DependencyUnavailable (503). A deadlock
    stays a DBAPIError, for the caller to retry.

    The deadline covers the connection and the statements, never the COMMIT: a COMMIT cut off would
    leave the caller not knowing whether its change was written, and a retry without an Idempotency-Key
    would make it twice. So the COMMIT runs to its end, whatever the deadline or a cancellation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    try:
        async with asyncio.timeout_at(deadline):
            conn = await engine.connect()
        try:
            async with asyncio.timeout_at(deadline):
                await conn.begin()
                yield conn
            await _commit_to_its_end(conn.commit())
        except BaseException as exc:
            await _end_failed(conn, exc, deadline_s)
            raise
        finally:
            await conn.close()
    except (DBAPIError, PoolTimeout, TimeoutError, OSError) as exc:
        if is_unreachable(exc):
            raise unavailable(what, exc) from exc
        raise


async def _end_failed(conn: AsyncConnection, exc: BaseException, deadline_s: float) -> None:
    """Roll back after a failure; a connection cut off mid-statement (a deadline) is discarded instead,
    since the state of its session is unknown."""
    if isinstance(exc, TimeoutError | asyncio.CancelledError) or not conn.in_transaction():
        await conn.invalidate()
        return
    try:
        async with asyncio.timeout(deadline_s):
            await conn.rollback()
    except Exception:  # noqa: BLE001 - a connection that cannot even roll back is of no more use
        await conn.invalidate()


@asynccontextmanager
async def autocommitted(engine: AsyncEngine, what: str, deadline_s: float) -> AsyncIterator[AsyncConnection]:
    """A connection of an AUTOCOMMIT engine, each statement its own transaction, under the deadline."""
    try:
        async with asyncio.timeout(deadline_s), engine.connect() as conn:
            yield conn
    except (DBAPIError, PoolTimeout, TimeoutError, OSError) as exc:
        if is_unreachable(exc):
            raise unavailable(what, exc) from exc
        raise
