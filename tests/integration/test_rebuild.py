"""Rebuild of the read model from the write model's state, on the real write DB, read DB and Redis."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from tests.integration.databases import read_db, write_db
from tests.integration.settings_override import Run
from todo_cqrs.adapters.cache import LIST_GENERATION_KEY, todo_key
from todo_cqrs.adapters.read_store import todos_view
from todo_cqrs.adapters.write_store import todos
from todo_cqrs.command import handlers
from todo_cqrs.command.handlers import Commands
from todo_cqrs.db import Database
from todo_cqrs.projection.handlers import Projection, project_event
from todo_cqrs.projection.rebuild import RETIRED, SHADOW, rebuild_read_model
from todo_cqrs.settings import settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]
COLUMNS = ("id", "title", "description", "status", "version", "created_at", "updated_at")
STRAY_ID = 2 * 10**12  # past every id a command or a read-model-only test uses


async def rows(database: Database, table: sa.Table, *where: sa.ColumnElement[bool]) -> set[tuple[Any, ...]]:
    async with database.autocommitted() as conn:
        result = await conn.execute(sa.select(*(table.c[c] for c in COLUMNS)).where(*where))
        return {tuple(r) for r in result}


async def read_model_row(todo_id: int) -> tuple[Any, ...] | None:
    """(deleted, version) of the read model's row; None when there is none."""
    async with read_db().autocommitted() as conn:
        result = await conn.execute(
            sa.select(todos_view.c.deleted, todos_view.c.version).where(todos_view.c.id == todo_id)
        )
        row = result.first()
    return tuple(row) if row else None


async def read_tables() -> set[str]:
    async with read_db().autocommitted() as conn:
        return set((await conn.execute(sa.text("SHOW TABLES"))).scalars())


def test_rebuild_copies_the_write_model_into_a_read_model_equal_to_it(
    run: Run[Any], commands: Commands, projection: Projection
) -> None:
    cache = projection.cache

    async def cached(key: str) -> bytes | None:
        value: bytes | None = await cache.client.get(key)
        return value

    async def history() -> tuple[dict[str, Any], dict[str, Any]]:
        kept = (
            await handlers.create_todo(commands, {"title": "kept", "description": "before the rebuild"})
        ).todo
        await handlers.update_todo(commands, kept.id, {"status": "FINISHED"}, None)
        gone = (await handlers.create_todo(commands, {"title": "gone"})).todo
        await handlers.delete_todo(commands, gone.id, None)
        # A stray row only the read model has (as if projected from nowhere): the rebuild must drop it.
        await project_event(projection, "todo.created.v1", {**kept.to_dict(), "id": STRAY_ID, "version": 1})
        await cache.store_todo(kept.id, 1, b'{"stale": true}')  # cached from the old read model
        await cache.invalidate(gone.id, 2)  # the live projection's marker of the deletion
        return kept.to_dict(), gone.to_dict()

    kept, gone = run(history())
    generation = int(run(cached(LIST_GENERATION_KEY)) or 0)
    progress: list[str] = []

    copied = run(rebuild_read_model(settings(), progress.append))

    assert copied >= 1
    assert any("swapped in" in line for line in progress)
    live = run(rows(read_db(), todos_view, todos_view.c.deleted == sa.false()))
    assert live == run(rows(write_db(), todos))
    assert run(read_model_row(gone["id"])) == (True, 2)
    assert run(read_model_row(STRAY_ID)) is None
    assert not {SHADOW, RETIRED} & run(read_tables())
    assert run(cached(todo_key(kept["id"]))) is None  # the stale entry is gone with the old read model...
    assert run(cached(todo_key(gone["id"]))) == b"2:i:"  # ...a marker stays: nothing older may be cached
    assert int(run(cached(LIST_GENERATION_KEY)) or 0) > generation  # every cached list is retired
