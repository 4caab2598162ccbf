"""`make rebuild` while 6 clients create and patch through the real functions, each change's event
projected as the KafkaSource would: once quiet, every acknowledged change reads back exactly."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from tests.integration.projecting import project_latest
from tests.integration.settings_override import Run
from todo_cqrs.projection.rebuild import rebuild_read_model
from todo_cqrs.settings import settings
from tools.sync_db import read_db, write_db

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

CLIENTS = 6
COLUMNS = "id, title, description, status, version, created_at, updated_at"


def test_a_rebuild_under_live_writes_loses_no_acknowledged_change(
    run: Run[Any], function_client: Callable[[str], TestClient]
) -> None:
    create, update, get = (function_client(n) for n in ("create_todo", "update_todo", "get_todos"))
    projection = function_client("project_event")
    rebuilding = threading.Event()
    done = threading.Event()
    acknowledged: dict[int, dict[str, Any]] = {}
    during_rebuild = [0]
    lock = threading.Lock()
    failures: list[BaseException] = []

    def client(number: int) -> None:
        try:
            mine: list[int] = []
            step = 0
            while not done.is_set() or step < 6:
                step += 1
                if len(mine) < 3 or step % 3 == 0:
                    answer = create.post("/", json={"title": f"live rebuild {number}.{step}"})
                    assert answer.status_code == 201, answer.text
                    mine.append(answer.json()["id"])
                else:
                    todo_id = mine[step % len(mine)]
                    answer = update.patch(f"/{todo_id}", json={"description": f"step {step}"})
                    assert answer.status_code == 200, answer.text
                todo = answer.json()
                project_latest(projection, todo["id"])
                with lock:
                    acknowledged[todo["id"]] = todo
                    if rebuilding.is_set() and not done.is_set():
                        during_rebuild[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    rebuilding.set()
    try:
        run(rebuild_read_model(settings(), progress=lambda _line: None))
    finally:
        done.set()
        for thread in threads:
            thread.join()

    assert not failures, failures
    assert during_rebuild[0] > 0, "no change was made while the rebuild ran"
    with read_db().connect() as conn:
        rows = conn.execute(
            sa.text(f"SELECT {COLUMNS} FROM todos_view WHERE id IN :ids AND deleted = 0").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": list(acknowledged)},
        ).all()
    with write_db().connect() as conn:
        expected = conn.execute(
            sa.text(f"SELECT {COLUMNS} FROM todos WHERE id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": list(acknowledged)},
        ).all()
    assert sorted(map(tuple, rows)) == sorted(map(tuple, expected))
    for todo_id, todo in acknowledged.items():
        answer = get.get(f"/{todo_id}")
        assert (answer.status_code, answer.json()) == (200, todo)
