"""The rebuild of the read model, raced by readers and by the live projection, on the real databases
and Redis: reads are served throughout, never go back in time, and the rebuilt model is whole."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from tests.integration.in_process import close_deps
from todo_cqrs import bootstrap
from todo_cqrs.adapters.read_store import todos_view
from todo_cqrs.adapters.write_store import outbox, todos
from todo_cqrs.command import handlers as commands
from todo_cqrs.command.handlers import Commands
from todo_cqrs.domain.errors import NotFound
from todo_cqrs.projection.handlers import Projection, project_event
from todo_cqrs.projection.rebuild import rebuild_read_model
from todo_cqrs.query import handlers as queries
from todo_cqrs.query.handlers import Queries, ReadRefused
from todo_cqrs.settings import settings
from tools.sync_db import read_db, write_db

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]


@dataclass
class Deps:
    """A command function's, get_todos' and project_event's dependencies, on one loop."""

    commands: Commands
    queries: Queries
    projection: Projection


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def deps(loop: asyncio.Runner) -> Iterator[Deps]:
    s = settings()
    built = Deps(bootstrap.commands(s), bootstrap.queries(s), bootstrap.projection(s))
    yield built
    loop.run(close_deps(built.commands))
    loop.run(built.queries.aclose())
    loop.run(built.projection.aclose())


async def _project_latest(projection: Projection, todo_id: int) -> None:
    """What the KafkaSource and project_event do with the todo's newest event."""
    with write_db().connect() as conn:
        row = conn.execute(
            sa.select(outbox).where(outbox.c.todo_id == todo_id).order_by(outbox.c.id.desc()).limit(1)
        ).one()
    await project_event(projection, row.event_type, row.payload, row.occurred_at)


async def _read_version(q: Queries, todo_id: int) -> int:
    """The version get_todos answers; -1 when it answers 404."""
    try:
        return (await queries.get_todo(q, todo_id)).version or 0
    except ReadRefused as refused:
        if isinstance(refused.error, NotFound):
            return -1
        raise


def test_readers_racing_a_rebuild_are_served_throughout_and_never_see_an_older_version(
    loop: asyncio.Runner, deps: Deps
) -> None:
    async def race() -> tuple[list[int], int]:
        created = await commands.create_todo(deps.commands, {"title": f"rebuild race {uuid.uuid4()}"})
        todo_id = created.todo.id
        await _project_latest(deps.projection, todo_id)
        seen: list[int] = []
        rebuilding = asyncio.get_running_loop().create_task(
            rebuild_read_model(settings(), progress=lambda _line: None)
        )

        async def read_until_done() -> None:
            while not rebuilding.done():
                seen.append(await _read_version(deps.queries, todo_id))
                await asyncio.sleep(0)

        async def change_until_done() -> None:
            version = 1
            while not rebuilding.done() and version < 50:
                await commands.update_todo(deps.commands, todo_id, {"title": f"v{version + 1}"}, None)
                version += 1
                await _project_latest(deps.projection, todo_id)
                await asyncio.sleep(0.005)

        await asyncio.gather(read_until_done(), change_until_done(), rebuilding)
        return seen, todo_id

    seen, todo_id = loop.run(race())
    assert seen, "the reader never ran during the rebuild"
    assert -1 not in seen, "a read during the rebuild did not find the todo"
    assert seen == sorted(seen), f"a read went back in time: {seen}"
    with write_db().connect() as conn:
        written = conn.execute(sa.select(todos.c.version).where(todos.c.id == todo_id)).scalar_one()
    with read_db().connect() as conn:
        projected = conn.execute(
            sa.select(todos_view.c.version).where(todos_view.c.id == todo_id)
        ).scalar_one()
    assert projected == written
    assert loop.run(_read_version(deps.queries, todo_id)) == written


def test_the_rebuilt_read_model_equals_the_write_model_row_for_row(loop: asyncio.Runner) -> None:
    loop.run(rebuild_read_model(settings(), progress=lambda _line: None))
    columns = ("id", "title", "description", "status", "version", "created_at", "updated_at")
    with write_db().connect() as conn:
        written = {tuple(r) for r in conn.execute(sa.select(*(todos.c[c] for c in columns)))}
    with read_db().connect() as conn:
        live = todos_view.c.deleted == sa.false()
        projected = {
            tuple(r) for r in conn.execute(sa.select(*(todos_view.c[c] for c in columns)).where(live))
        }
        leftovers = conn.execute(sa.text("SHOW TABLES LIKE 'todos_view_%'")).all()
    assert projected == written
    assert leftovers == []  # the shadow and the retired table are gone
