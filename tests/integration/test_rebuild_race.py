"""The rebuild of the read model, raced by readers and by the live projection, on the real databases
and Redis: reads are served throughout, never go back in time, and the rebuilt model is whole."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from local.sync_db import read_db, write_db
from todo_cqrs.adapters.read_store import todos_view
from todo_cqrs.adapters.write_store import outbox, todos
from todo_cqrs.command import handlers as commands
from todo_cqrs.command.idempotency import Reply
from todo_cqrs.domain.errors import NotFound
from todo_cqrs.loop_local import close_loop_resources
from todo_cqrs.projection.handlers import project_event
from todo_cqrs.projection.rebuild import rebuild_read_model
from todo_cqrs.query import handlers as queries

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner
        runner.run(close_loop_resources())


def _reply(todo: Any) -> Reply:
    return Reply(200, {}, orjson.dumps(todo.to_dict()))


async def _project_latest(todo_id: int) -> None:
    """What the KafkaSource and project_event do with the todo's newest event."""
    with write_db().connect() as conn:
        row = conn.execute(
            sa.select(outbox).where(outbox.c.todo_id == todo_id).order_by(outbox.c.id.desc()).limit(1)
        ).one()
    await project_event(row.event_type, row.payload, row.occurred_at)


def test_readers_racing_a_rebuild_are_served_throughout_and_never_see_an_older_version(
    loop: asyncio.Runner,
) -> None:
    async def race() -> tuple[list[int], int]:
        created = await commands.create_todo({"title": f"rebuild race {uuid.uuid4()}"}, _reply)
        todo_id = orjson.loads(created.body)["id"]
        await _project_latest(todo_id)
        seen: list[int] = []
        rebuilding = asyncio.get_running_loop().create_task(rebuild_read_model(settings(), progress=lambda _line: None))

        async def read_until_done() -> None:
            while not rebuilding.done():
                try:
                    seen.append((await queries.get_todo(todo_id)).version or 0)
                except NotFound:
                    seen.append(-1)
                await asyncio.sleep(0)

        async def change_until_done() -> None:
            version = 1
            while not rebuilding.done() and version < 50:
                await commands.update_todo(todo_id, {"title": f"v{version + 1}"}, None, _reply)
                version += 1
                await _project_latest(todo_id)
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
    assert loop.run(queries.get_todo(todo_id)).version == written


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
