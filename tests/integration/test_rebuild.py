"""Rebuild of the read model from the write model's state, on the real write DB, read DB and Redis."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.settings_override import Run
from todo_cqrs.adapters.cache import LIST_GENERATION_KEY, todo_cache, todo_key
from todo_cqrs.adapters.read_store import todos_view
from todo_cqrs.adapters.write_store import todos
from todo_cqrs.command import handlers
from todo_cqrs.db import read_engine, write_engine
from todo_cqrs.http import todo_reply
from todo_cqrs.projection.handlers import project_event
from todo_cqrs.projection.rebuild import RETIRED, SHADOW, rebuild_read_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]
COLUMNS = ("id", "title", "description", "status", "version", "created_at", "updated_at")
STRAY_ID = 2 * 10**12  # past every id a command or a read-model-only test uses


async def rows(
    engine: Callable[[], AsyncEngine], table: sa.Table, *where: sa.ColumnElement[bool]
) -> set[tuple[Any, ...]]:
    async with engine().connect() as conn:
        result = await conn.execute(sa.select(*(table.c[c] for c in COLUMNS)).where(*where))
        return {tuple(r) for r in result}


async def read_model_row(todo_id: int) -> tuple[Any, ...] | None:
    """(deleted, version) of the read model's row; None when there is none."""
    async with read_engine().connect() as conn:
        result = await conn.execute(
            sa.select(todos_view.c.deleted, todos_view.c.version).where(todos_view.c.id == todo_id)
        )
        row = result.first()
    return tuple(row) if row else None


async def read_tables() -> set[str]:
    async with read_engine().connect() as conn:
        return set((await conn.execute(sa.text("SHOW TABLES"))).scalars())


async def cached(key: str) -> bytes | None:
    return await todo_cache().client.get(key)


async def command(handler: Any, *args: Any) -> dict[str, Any]:
    """A command through its handler, as its function calls it; the todo it answers."""
    return json.loads((await handler(*args, todo_reply)).body)


def test_rebuild_copies_the_write_model_into_a_read_model_equal_to_it(run: Run[Any]) -> None:
    async def history() -> tuple[dict[str, Any], dict[str, Any]]:
        kept = await command(handlers.create_todo, {"title": "kept", "description": "before the rebuild"})
        await command(handlers.update_todo, kept["id"], {"status": "FINISHED"}, None)
        gone = await command(handlers.create_todo, {"title": "gone"})
        await command(handlers.delete_todo, gone["id"], None)
        # A stray row only the read model has (as if projected from nowhere): the rebuild must drop it.
        await project_event("todo.created.v1", {**kept, "id": STRAY_ID, "version": 1})
        await todo_cache().store_todo(kept["id"], 1, b'{"stale": true}')  # cached from the old read model
        await todo_cache().invalidate(gone["id"], 2)  # the live projection's marker of the deletion
        return kept, gone

    kept, gone = run(history())
    generation = int(run(cached(LIST_GENERATION_KEY)) or 0)
    progress: list[str] = []

    copied = run(rebuild_read_model(settings(), progress.append))

    assert copied >= 1
    assert any("swapped in" in line for line in progress)
    live = run(rows(read_engine, todos_view, todos_view.c.deleted == sa.false()))
    assert live == run(rows(write_engine, todos))
    assert run(read_model_row(gone["id"])) == (True, 2)
    assert run(read_model_row(STRAY_ID)) is None
    assert not {SHADOW, RETIRED} & run(read_tables())
    assert run(cached(todo_key(kept["id"]))) is None  # the stale entry is gone with the old read model...
    assert run(cached(todo_key(gone["id"]))) == b"2:i:"  # ...a marker stays: nothing older may be cached
    assert int(run(cached(LIST_GENERATION_KEY)) or 0) > generation  # every cached list is retired
