"""The write transaction against the real MariaDB: its deadline bounds the statements, never the COMMIT.

A COMMIT cut off by a deadline would leave the caller not knowing whether its change was written (a
retry without an Idempotency-Key would then write it twice), so a COMMIT that waits for a frozen
database finishes once the database answers, and the change is there.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa

from tests.integration.databases import write_db
from tests.integration.settings_override import Run
from todo_cqrs.adapters.write_store import todos
from todo_cqrs.db import Statements
from todo_cqrs.domain.errors import DependencyUnavailable
from tools import services

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]


async def titled(title: str) -> int:
    async with write_db().engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(todos).where(todos.c.title == title)
        return int((await conn.execute(query)).scalar_one())


async def insert_todo(statements: Statements, title: str) -> None:
    await statements.execute(
        "INSERT INTO todos (title, description, status, version, created_at, updated_at) "
        "VALUES (%s, '', 'CREATED', 1, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3))",
        (title,),
    )


async def in_a_transaction(work: Callable[[Statements], Awaitable[None]]) -> None:
    """As a command runs (todo_cqrs/adapters/write_store.WriteStore.run)."""
    await write_db().run_statements(work)


def test_a_commit_waiting_for_a_frozen_database_is_not_cut_off_by_the_deadline(run: Run[Any]) -> None:
    title = f"committed after a freeze {uuid.uuid4()}"
    frozen_s = write_db().deadline_s + 1.0
    thawed = threading.Event()

    async def insert_then_freeze(statements: Statements) -> None:
        await insert_todo(statements, title)
        services.pause("mariadb")  # the COMMIT that follows waits for it
        threading.Timer(frozen_s, lambda: (services.resume("mariadb"), thawed.set())).start()

    started = time.monotonic()
    try:
        run(in_a_transaction(insert_then_freeze))
    finally:
        thawed.wait(frozen_s + 10)
    assert time.monotonic() - started >= frozen_s  # longer than the deadline, and not refused
    assert run(titled(title)) == 1


def test_statements_that_outlast_the_deadline_answer_503_and_write_nothing(run: Run[Any]) -> None:
    title = f"never committed {uuid.uuid4()}"

    async def insert_then_wait_too_long(statements: Statements) -> None:
        await insert_todo(statements, title)
        await statements.execute("SELECT SLEEP(%s)", (write_db().deadline_s + 1,))

    with pytest.raises(DependencyUnavailable):
        run(in_a_transaction(insert_then_wait_too_long))
    assert run(titled(title)) == 0
