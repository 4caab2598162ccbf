"""Reconciliation on the real write DB, read DB and Redis: each way the read model can drift from the
write model is found and repaired to it, the metrics count it, and the cache follows.

Todos are made through the command functions; the read model is first brought in line by a pass
(what the projection would have done), then corrupted with plain SQL, as an operator or a bad
restore would, and a pass (grace 0, or the function with RECONCILE_GRACE_SECONDS=0) repairs it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from tests.integration.projecting import project_latest
from tests.integration.settings_override import Run
from todo_cqrs import bootstrap
from todo_cqrs.adapters.cache import todo_key
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.reconcile.passes import PassReport, Reconciler
from todo_cqrs.reconcile.service import batch_engine
from todo_cqrs.reconcile.sides import Row, WriteSide
from todo_cqrs.settings import settings
from tools.sync_db import read_db, write_db

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

COLUMNS = "id, title, description, status, version, created_at, updated_at"


async def reconcile_once(grace_s: float = 0.0) -> PassReport:
    """One pass over every todo, as the reconcile function runs it."""
    s = settings()
    write, read = batch_engine(s.write_db_url), batch_engine(s.read_db_url)
    cache = bootstrap.todo_cache(s)
    try:
        return await Reconciler(write, read, cache, grace_s=grace_s).run_pass()
    finally:
        await cache.aclose()
        await write.dispose()
        await read.dispose()


def written(todo_id: int) -> tuple[Any, ...] | None:
    with write_db().connect() as conn:
        row = conn.execute(sa.text(f"SELECT {COLUMNS} FROM todos WHERE id = :id"), {"id": todo_id}).first()
    return tuple(row) if row else None


def held(todo_id: int) -> tuple[Any, ...] | None:
    """The read model's row: (columns..., deleted)."""
    with read_db().connect() as conn:
        statement = sa.text(f"SELECT {COLUMNS}, deleted FROM todos_view WHERE id = :id")
        row = conn.execute(statement, {"id": todo_id}).first()
    return tuple(row) if row else None


def version_and_deleted(todo_id: int) -> tuple[int, int] | None:
    row = held(todo_id)
    return (row[4], row[7]) if row else None


def corrupt(statement: str, **params: Any) -> None:
    with read_db().begin() as conn:
        conn.execute(sa.text(statement), params)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def commands(function_client: Callable[[str], TestClient]) -> dict[str, TestClient]:
    return {
        name: function_client(name) for name in ("create_todo", "update_todo", "delete_todo", "get_todos")
    }


@pytest.fixture(scope="module")
def raw_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings().redis_url, socket_timeout=2)
    yield client
    client.close()


def create(commands: dict[str, TestClient], title: str) -> dict[str, Any]:
    response = commands["create_todo"].post("/", json={"title": title})
    assert response.status_code == 201, response.text
    return response.json()


def patch(commands: dict[str, TestClient], todo_id: int, **fields: Any) -> dict[str, Any]:
    response = commands["update_todo"].patch(f"/{todo_id}", json=fields)
    assert response.status_code == 200, response.text
    return response.json()


def delete(commands: dict[str, TestClient], todo_id: int) -> None:
    assert commands["delete_todo"].delete(f"/{todo_id}").status_code == 200


def cache_stale_entry(raw_redis: redis.Redis, todo_id: int, version: int) -> None:
    """What a reader leaves in the cache after reading the corrupted row."""
    raw_redis.set(todo_key(todo_id), f'{version}:t:{{"id": {todo_id}, "title": "stale"}}', ex=300)


def assert_repaired(report: PassReport, todo_id: int, kind: str) -> None:
    assert todo_id in report.repaired_ids
    assert report.repaired[kind] >= 1


# --- each kind of drift ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "corruption"),
    [
        ("missing", "DELETE FROM todos_view WHERE id = :id"),
        ("missing", "UPDATE todos_view SET deleted = 1, title = '' WHERE id = :id"),
        ("different", "UPDATE todos_view SET title = 'changed by hand', status = 'CANCELED' WHERE id = :id"),
        ("different", "UPDATE todos_view SET description = CONCAT(description, ' ') WHERE id = :id"),
        ("different", "UPDATE todos_view SET version = version + 1000000 WHERE id = :id"),
        ("different", "UPDATE todos_view SET version = version - 1, title = 'older' WHERE id = :id"),
        ("different", "UPDATE todos_view SET updated_at = updated_at - INTERVAL 1 DAY WHERE id = :id"),
    ],
    ids=["row-deleted", "tombstoned", "fields", "trailing-space", "higher-version", "lower-version", "time"],
)
def test_a_live_todo_drifted_in_the_read_model_is_repaired_to_the_write_model(
    run: Run[Any], commands: dict[str, TestClient], raw_redis: redis.Redis, kind: str, corruption: str
) -> None:
    todo = create(commands, f"reconcile {kind}")
    todo = patch(commands, todo["id"], description="second version")
    run(reconcile_once())
    assert held(todo["id"]) == (*written(todo["id"]), 0)  # type: ignore[misc]
    corrupt(corruption, id=todo["id"])
    assert held(todo["id"]) != (*written(todo["id"]), 0)  # type: ignore[misc]
    cache_stale_entry(raw_redis, todo["id"], 1_000_000 + todo["version"])
    drift_before, repaired_before = (
        counter("todo_reconcile_drift_total", kind=kind),
        counter("todo_reconcile_repaired_total"),
    )

    report = run(reconcile_once())

    assert_repaired(report, todo["id"], kind)
    assert held(todo["id"]) == (*written(todo["id"]), 0)  # type: ignore[misc]
    assert counter("todo_reconcile_drift_total", kind=kind) >= drift_before + 1
    assert counter("todo_reconcile_repaired_total") >= repaired_before + 1
    cached = raw_redis.get(todo_key(todo["id"]))
    assert cached is None or b":t:" not in cached  # the stale entry was invalidated
    answer = commands["get_todos"].get(f"/{todo['id']}")
    assert (answer.status_code, answer.json()) == (200, todo)


def test_a_deleted_todo_brought_back_in_the_read_model_becomes_a_tombstone_again(
    run: Run[Any], commands: dict[str, TestClient], raw_redis: redis.Redis
) -> None:
    todo = create(commands, "reconcile zombie")
    run(reconcile_once())
    delete(commands, todo["id"])
    run(reconcile_once())  # what the projection does with the deletion: a tombstone at version 2
    assert version_and_deleted(todo["id"]) == (2, 1)
    corrupt("UPDATE todos_view SET deleted = 0, title = 'zombie' WHERE id = :id", id=todo["id"])
    cache_stale_entry(raw_redis, todo["id"], 2)
    assert commands["get_todos"].get(f"/{todo['id']}").status_code == 200  # the zombie, cached

    report = run(reconcile_once())

    assert_repaired(report, todo["id"], "extra")
    assert version_and_deleted(todo["id"]) == (2, 1)
    assert commands["get_todos"].get(f"/{todo['id']}").status_code == 404


def test_a_read_row_of_an_assigned_id_the_write_model_lacks_becomes_a_tombstone(
    run: Run[Any], commands: dict[str, TestClient]
) -> None:
    todo = create(commands, "reconcile never projected")
    delete(commands, todo["id"])  # deleted before anything reached the read model
    assert held(todo["id"]) is None
    corrupt(
        f"INSERT INTO todos_view ({COLUMNS}, deleted) "
        "VALUES (:id, 'from an old backup', '', 'CREATED', 1, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3), 0)",
        id=todo["id"],
    )

    report = run(reconcile_once())

    assert_repaired(report, todo["id"], "extra")
    assert version_and_deleted(todo["id"]) == (2, 1)  # the deletion's version, from the outbox
    assert commands["get_todos"].get(f"/{todo['id']}").status_code == 404


def test_a_read_row_of_an_id_not_yet_assigned_is_removed_and_blocks_no_later_create(
    run: Run[Any], commands: dict[str, TestClient]
) -> None:
    with write_db().connect() as conn:
        next_id = conn.execute(
            sa.text(
                "SELECT AUTO_INCREMENT FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'todos'"
            )
        ).scalar_one()
    future_id = int(next_id) + 5
    corrupt(
        f"INSERT INTO todos_view ({COLUMNS}, deleted) "
        "VALUES (:id, 'from the future', '', 'CREATED', 7, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3), 0)",
        id=future_id,
    )
    extra_before = counter("todo_reconcile_drift_total", kind="extra")

    report = run(reconcile_once())

    assert_repaired(report, future_id, "extra")
    assert held(future_id) is None
    assert counter("todo_reconcile_drift_total", kind="extra") >= extra_before + 1


def test_a_difference_younger_than_the_grace_period_is_left_to_the_projection(
    run: Run[Any], commands: dict[str, TestClient]
) -> None:
    todo = create(commands, "reconcile in flight")
    run(reconcile_once())
    todo = patch(commands, todo["id"], title="just changed")  # its event is not projected (yet)
    before = held(todo["id"])

    report = run(reconcile_once(grace_s=3600))

    assert report.in_flight >= 1
    assert todo["id"] not in report.repaired_ids
    assert held(todo["id"]) == before
    assert todo["id"] in run(reconcile_once(grace_s=0)).repaired_ids


def test_a_clean_pass_finds_nothing(run: Run[Any]) -> None:
    run(reconcile_once())

    report = run(reconcile_once())

    assert sum(report.drift.values()) == 0
    assert report.leaves == 0


# --- through the function ------------------------------------------------------------------------------


@pytest.fixture
def reconcile_function(
    function_client: Callable[[str], TestClient], monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setenv("RECONCILE_GRACE_SECONDS", "0")
    settings.cache_clear()
    yield function_client("reconcile")
    monkeypatch.undo()
    settings.cache_clear()


def test_the_function_runs_a_pass_and_answers_what_it_found_and_its_metrics_count_it(
    run: Run[Any], commands: dict[str, TestClient], reconcile_function: TestClient
) -> None:
    todo = create(commands, "reconcile through the function")
    run(reconcile_once())
    corrupt("DELETE FROM todos_view WHERE id = :id", id=todo["id"])

    answer = reconcile_function.post("/", json={"reason": "a tick"})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["drift"]["missing"] >= 1 and body["repaired"]["missing"] >= 1
    assert held(todo["id"]) == (*written(todo["id"]), 0)  # type: ignore[misc]
    exposition = reconcile_function.get("/metrics").text
    for line in (
        "todo_reconcile_passes_total ",
        'todo_reconcile_drift_total{kind="missing"} ',
        'todo_reconcile_drift_total{kind="different"} ',
        'todo_reconcile_drift_total{kind="extra"} ',
        "todo_reconcile_repaired_total ",
        "todo_reconcile_last_pass_timestamp_seconds ",
    ):
        assert line in exposition


# --- never racing the projection ------------------------------------------------------------------------


def test_passes_during_a_stream_of_commands_never_take_a_read_row_back_to_an_older_version(
    run: Run[Any], commands: dict[str, TestClient], function_client: Callable[[str], TestClient]
) -> None:
    """Commands change todos and the projection applies their events while passes with no grace run:
    the read model's version of a todo never goes down, and once quiet both models are equal."""
    projection = function_client("project_event")
    todos = [create(commands, f"reconcile stream {i}")["id"] for i in range(4)]
    run(reconcile_once())
    stop = threading.Event()
    seen: dict[int, list[int]] = {todo_id: [] for todo_id in todos}

    def change_and_project() -> None:
        for round_ in range(40):
            for todo_id in todos:
                patch(commands, todo_id, title=f"round {round_}")
                project_latest(projection, todo_id)
        stop.set()

    def watch() -> None:
        while not stop.is_set():
            for todo_id in todos:
                row = held(todo_id)
                seen[todo_id].append(row[4] if row else 0)

    workers = [threading.Thread(target=change_and_project), threading.Thread(target=watch)]
    for worker in workers:
        worker.start()
    passes = 0
    while not stop.is_set():
        run(reconcile_once(grace_s=0))
        passes += 1
    for worker in workers:
        worker.join()

    assert passes >= 2
    for todo_id, versions in seen.items():
        assert versions == sorted(versions), f"todo {todo_id} went back: {versions}"
    run(reconcile_once(grace_s=0))
    for todo_id in todos:
        assert held(todo_id) == (*written(todo_id), 0)  # type: ignore[misc]


def test_a_read_row_the_projection_changes_during_a_repair_is_not_taken_back(
    run: Run[Any], commands: dict[str, TestClient], function_client: Callable[[str], TestClient]
) -> None:
    """The exact interleaving: the pass has read the drifted read row and the write row, then a command
    commits version 2 and the projection applies it, then the pass repairs: its guard sees the row
    changed and leaves it (the next pass finds it equal)."""
    projection = function_client("project_event")
    todo = create(commands, "reconcile interleaved")
    run(reconcile_once())
    corrupt("UPDATE todos_view SET title = 'drifted by hand' WHERE id = :id", id=todo["id"])

    class CommandRightAfterTheRead(WriteSide):
        """The write model, with a command and its projection right after the pass read the rows."""

        async def rows(self, todo_ids: list[int]) -> tuple[dict[int, Row], Any]:
            found = await super().rows(todo_ids)
            if todo["id"] in todo_ids:
                await asyncio.to_thread(patch, commands, todo["id"], title="changed during the pass")
                await asyncio.to_thread(project_latest, projection, todo["id"])
            return found

    async def interleaved_pass() -> PassReport:
        s = settings()
        write, read = batch_engine(s.write_db_url), batch_engine(s.read_db_url)
        cache = bootstrap.todo_cache(s)
        try:
            reconciler = Reconciler(write, read, cache, grace_s=0)
            reconciler.write = CommandRightAfterTheRead(write)
            return await reconciler.run_pass()
        finally:
            await cache.aclose()
            await write.dispose()
            await read.dispose()

    report = run(interleaved_pass())

    assert report.changed_meanwhile >= 1
    assert todo["id"] not in report.repaired_ids
    assert version_and_deleted(todo["id"]) == (2, 0)
    assert held(todo["id"]) == (*written(todo["id"]), 0)  # type: ignore[misc]


def test_a_repair_made_while_redis_is_down_answers_503_and_is_invalidated_by_the_next_pass(
    run: Run[Any], commands: dict[str, TestClient], raw_redis: redis.Redis
) -> None:
    todo = create(commands, "reconcile without redis")
    run(reconcile_once())
    corrupt("UPDATE todos_view SET title = 'drifted while redis was down' WHERE id = :id", id=todo["id"])
    cache_stale_entry(raw_redis, todo["id"], todo["version"])

    async def two_passes() -> tuple[BaseException | None, PassReport]:
        s = settings()
        write, read = batch_engine(s.write_db_url), batch_engine(s.read_db_url)
        down = bootstrap.todo_cache(replace(s, redis_url="redis://127.0.0.1:1/0"))  # nothing listens there
        up = bootstrap.todo_cache(s)
        reconciler = Reconciler(write, read, down, grace_s=0)
        try:
            try:
                await reconciler.run_pass()
                failed = None
            except DependencyUnavailable as exc:
                failed = exc
            reconciler.cache = up  # Redis is back
            return failed, await reconciler.run_pass()
        finally:
            for cache in (down, up):
                await cache.aclose()
            await write.dispose()
            await read.dispose()

    failed, second = run(two_passes())

    assert failed is not None  # the tick answers 503
    assert held(todo["id"]) == (*written(todo["id"]), 0)  # type: ignore[misc]  # repaired all the same
    assert todo["id"] not in second.repaired_ids
    cached = raw_redis.get(todo_key(todo["id"]))
    assert cached is None or b":t:" not in cached  # invalidated once Redis answered again
