"""get_todos on the real Redis and read DB; the read model is seeded through the projection, as in production.

Todo ids come from a random high range nobody else writes, and each ends as a tombstone. Lists show every
live todo, so list tests start from a cursor just before their own ids and assert only about those.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import functions_framework
import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from local import services
from tests.integration.read_model_ids import (
    CREATED,
    DELETED,
    UPDATED,
    todo_data,
)
from tests.integration.settings_override import overridden_setting
from todo_cqrs.adapters import cache as cache_module
from todo_cqrs.adapters.cache import todo_key
from todo_cqrs.adapters.read_store import get_row, read_connection
from todo_cqrs.projection.handlers import project_event
from todo_cqrs.query import handlers as query_handlers
from todo_cqrs.settings import settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

CLOSED_REDIS_URL = "redis://127.0.0.1:1/0"
DEADLINE_S = 5.0


@pytest.fixture(scope="module")
def client() -> FlaskClient:
    return functions_framework.create_app(
        target="get_todos", source="functions/get_todos/main.py"
    ).test_client()


@pytest.fixture(scope="module")
def raw_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings().redis_url, socket_timeout=2)
    yield client
    client.close()


def project(todo_id: int, version: int, **fields: Any) -> dict[str, Any]:
    """Apply a created (version 1) or updated event through the projection; returns the todo."""
    data = todo_data(todo_id, version, **fields)
    project_event(CREATED if version == 1 else UPDATED, data)
    return data


def get(client: FlaskClient, todo_id: int, **params: Any) -> TestResponse:
    return client.get(f"/todo/{todo_id}", query_string=params)


def get_until(client: FlaskClient, path: str, cache_state: str, **params: Any) -> TestResponse:
    """GET until X-Cache is cache_state (others' projections retire cached lists at any time)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        response = client.get(path, query_string=params)
        if response.headers["X-Cache"] == cache_state or time.monotonic() > deadline:
            return response


@contextmanager
def redis_stopped() -> Iterator[None]:
    """Redis unreachable: frozen (SIGSTOP) when local.services runs it, else the client points at a closed
    port. Always resumed, even when the test fails."""
    redis_service = next(s for s in services.status() if s.name == "redis")
    if redis_service.state == "running":
        services.pause("redis")
        try:
            yield
        finally:
            services.resume("redis")
    else:
        with overridden_setting("REDIS_URL", CLOSED_REDIS_URL, cache_module.todo_cache):
            yield


# --- one todo: hit, miss, 304, 404 --------------------------------------------------------------------


def test_first_read_misses_then_hits(client: FlaskClient, new_ids: Callable[[int], list[int]]) -> None:
    [todo_id] = new_ids(1)
    todo = project(todo_id, 1, title="buy milk")

    first, second = get(client, todo_id), client.get(f"/{todo_id}")

    assert (first.status_code, first.headers["X-Cache"], first.headers["ETag"]) == (200, "miss", '"1"')
    assert (second.status_code, second.headers["X-Cache"], second.headers["ETag"]) == (200, "hit", '"1"')
    assert first.get_json() == second.get_json() == todo
    not_modified = client.get(f"/{todo_id}", headers={"If-None-Match": '"1"'})
    assert (not_modified.status_code, not_modified.data) == (304, b"")


def test_unknown_and_deleted_todos_are_404(client: FlaskClient, new_ids: Callable[[int], list[int]]) -> None:
    never_seen, deleted = new_ids(2)
    project(deleted, 1)
    assert get(client, deleted).status_code == 200
    project_event(DELETED, {"id": deleted, "version": 2})
    assert get(client, never_seen).status_code == 404
    assert get(client, deleted).status_code == 404


def test_projection_invalidates_the_cached_todo(
    client: FlaskClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    project(todo_id, 1)
    get(client, todo_id)
    assert get(client, todo_id).headers["X-Cache"] == "hit"

    updated = project(todo_id, 2, title="second")

    after = get(client, todo_id)
    assert (after.headers["X-Cache"], after.get_json()) == ("miss", updated)
    assert (get(client, todo_id).headers["X-Cache"], get(client, todo_id).get_json()) == ("hit", updated)


# --- the cache never goes back in time ----------------------------------------------------------------


def test_reader_that_loaded_an_old_version_cannot_store_it_after_a_newer_invalidation(
    client: FlaskClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    project(todo_id, 1)
    cache = cache_module.todo_cache()
    # The reader misses and loads version 1 from the read DB...
    assert cache.get_todo(todo_id) is None
    with read_connection() as conn:
        loaded, _ = get_row(conn, todo_id)
    assert loaded is not None and loaded.version == 1
    # ...version 2 is projected and invalidated meanwhile...
    newer = project(todo_id, 2, title="second")
    # ...and only then does the reader store what it loaded.
    cache.store_todo(todo_id, 1, json.dumps(loaded.to_dict()).encode())

    assert cache.get_todo(todo_id) is None
    after = get(client, todo_id)
    assert (after.headers["X-Cache"], after.get_json()) == ("miss", newer)
    assert (get(client, todo_id).headers["X-Cache"], get(client, todo_id).get_json()) == ("hit", newer)


def test_store_invalidate_stale_store_keeps_the_marker(
    new_ids: Callable[[int], list[int]], raw_redis: redis.Redis
) -> None:
    [todo_id] = new_ids(1)  # only the cache is used here: the ids keep it apart from everyone's
    cache = cache_module.todo_cache()
    cache.store_todo(todo_id, 1, b'{"version":1}')
    assert cache.get_todo(todo_id) == cache_module.CachedTodo(1, b'{"version":1}')

    cache.invalidate(todo_id, 2)
    cache.store_todo(todo_id, 1, b'{"version":1}')
    assert cache.get_todo(todo_id) is None
    assert raw_redis.get(todo_key(todo_id)) == b"2:i:"

    cache.store_todo(todo_id, 2, b'{"version":2}')
    cache.store_todo(todo_id, 1, b'{"version":1}')
    cache.invalidate(todo_id, 1)  # a late invalidation of an older version keeps the newer floor
    cache.store_todo(todo_id, 1, b'{"version":1}')
    assert raw_redis.get(todo_key(todo_id)) == b"2:i:"
    cache.store_todo(todo_id, 2, b'{"version":2}')
    assert cache.get_todo(todo_id) == cache_module.CachedTodo(2, b'{"version":2}')


def test_the_race_through_the_handler_leaves_no_stale_entry(
    client: FlaskClient, new_ids: Callable[[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    [todo_id] = new_ids(1)
    project(todo_id, 1)
    newer: dict[str, Any] = {}

    def get_row_then_projection_lands(conn: Any, wanted: int) -> Any:
        row = get_row(conn, wanted)
        if not newer:  # the projection commits and invalidates between this read and the reader's store
            newer.update(project(todo_id, 2, title="second"))
        return row

    monkeypatch.setattr(query_handlers, "get_row", get_row_then_projection_lands)
    racing = get(client, todo_id)
    monkeypatch.undo()

    assert (racing.headers["X-Cache"], racing.get_json()["version"]) == ("miss", 1)  # current when read
    after = get(client, todo_id)
    assert (after.headers["X-Cache"], after.get_json()) == ("miss", newer)


# --- lists --------------------------------------------------------------------------------------------


def test_list_pages_by_cursor_with_a_status_filter(
    client: FlaskClient, new_ids: Callable[[int], list[int]]
) -> None:
    ids = new_ids(9)
    for n, todo_id in enumerate(ids):
        project(todo_id, 1)
        if n % 3 != 1:
            project(todo_id, 2, status="IN_PROGRESS")
    in_progress = [todo_id for n, todo_id in enumerate(ids) if n % 3 != 1]

    seen: list[int] = []
    cursor: str | None = query_handlers.encode_cursor(ids[0] - 1)
    pages = 0
    while cursor is not None and (not seen or seen[-1] < ids[-1]):
        response = client.get("/todo", query_string={"status": "IN_PROGRESS", "limit": 2, "cursor": cursor})
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        page_ids = [item["id"] for item in page["items"]]
        assert 1 <= len(page_ids) <= 2
        assert page_ids == sorted(page_ids) and (not seen or page_ids[0] > seen[-1])  # no overlap
        assert all(item["status"] == "IN_PROGRESS" for item in page["items"])
        seen += page_ids
        cursor, pages = page["next_cursor"], pages + 1

    mine = [todo_id for todo_id in seen if ids[0] <= todo_id <= ids[-1]]
    assert mine == in_progress
    assert pages >= 3


def test_list_cache_is_invalidated_by_a_projection(
    client: FlaskClient, new_ids: Callable[[int], list[int]]
) -> None:
    ids = new_ids(3)
    for todo_id in ids:
        project(todo_id, 1)
    page = {"cursor": query_handlers.encode_cursor(ids[0] - 1), "limit": 3}
    get(client, ids[0])
    cached = get_until(client, "/todo", "hit", **page)
    assert cached.headers["X-Cache"] == "hit"
    assert [item["id"] for item in cached.get_json()["items"]] == ids

    project(ids[1], 2, title="renamed")

    after = client.get("/todo", query_string=page)
    assert after.headers["X-Cache"] == "miss"
    assert [item["title"] for item in after.get_json()["items"]] == ["v1", "renamed", "v1"]


# --- Redis stopped mid-test ---------------------------------------------------------------------------


def test_redis_stopped_mid_test_is_bypassed(client: FlaskClient, new_ids: Callable[[int], list[int]]) -> None:
    [todo_id] = new_ids(1)
    todo = project(todo_id, 1)
    get(client, todo_id)
    assert get(client, todo_id).headers["X-Cache"] == "hit"
    page = {"cursor": query_handlers.encode_cursor(todo_id - 1), "limit": 1}

    with redis_stopped():
        one, listed = get(client, todo_id), client.get("/todo", query_string=page)
        assert (one.status_code, one.headers["X-Cache"], one.get_json()) == (200, "bypass", todo)
        assert (listed.status_code, listed.headers["X-Cache"]) == (200, "bypass")
        assert listed.get_json()["items"] == [todo]

    # Back: reads use Redis again once the short breaker after the failure has passed.
    deadline = time.monotonic() + DEADLINE_S
    while (state := get(client, todo_id).headers["X-Cache"]) == "bypass" and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the breaker, not waiting in its place
    assert state in ("hit", "miss")
    assert get(client, todo_id).headers["X-Cache"] == "hit"


# --- min_version: read-your-writes --------------------------------------------------------------------


def test_min_version_already_projected_answers_at_once(
    client: FlaskClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    project(todo_id, 1)
    updated = project(todo_id, 2, title="second")
    for wanted in (1, 2):
        response = get(client, todo_id, min_version=wanted)
        assert (response.status_code, response.get_json()) == (200, updated)


def test_min_version_that_never_arrives_is_503_not_yet_consistent(
    client: FlaskClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    project(todo_id, 1)
    with overridden_setting("MIN_VERSION_WAIT_SECONDS", "0.3"):
        response = get(client, todo_id, min_version=2)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "not_yet_consistent"
    assert int(response.headers["Retry-After"]) >= 1


def test_min_version_of_a_deletion_is_404(client: FlaskClient, new_ids: Callable[[int], list[int]]) -> None:
    [todo_id] = new_ids(1)
    project(todo_id, 1)
    project_event(DELETED, {"id": todo_id, "version": 2})
    assert get(client, todo_id, min_version=2).status_code == 404


def test_min_version_waits_for_the_projection_to_land(
    client: FlaskClient, new_ids: Callable[[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    [todo_id] = new_ids(1)
    project(todo_id, 1)
    get(client, todo_id)
    # Version 1 is cached: not enough for min_version 2.
    assert get(client, todo_id).headers["X-Cache"] == "hit"
    first_read, landed = threading.Event(), threading.Event()
    reads: list[int | None] = []
    newer: dict[str, Any] = {}

    def projection() -> None:
        if first_read.wait(timeout=DEADLINE_S):
            newer.update(project(todo_id, 2, title=f"landed {uuid.uuid4()}"))
        landed.set()

    def observed_get_row(conn: Any, wanted: int) -> Any:
        row = get_row(conn, wanted)
        reads.append(row[1])
        first_read.set()
        # The reader has seen version 1: hold it until the projection committed, so its next poll is
        # the one that must find version 2, whatever the scheduling.
        landed.wait(timeout=DEADLINE_S)
        return row

    monkeypatch.setattr(query_handlers, "get_row", observed_get_row)
    applier = threading.Thread(target=projection)
    applier.start()
    try:
        response = get(client, todo_id, min_version=2)
    finally:
        first_read.set()
        applier.join(timeout=DEADLINE_S)
        monkeypatch.undo()

    assert (response.status_code, response.get_json()) == (200, newer)
    assert reads == [1, 2]
    assert get(client, todo_id).get_json() == newer


def test_bad_min_version_is_422(client: FlaskClient, new_ids: Callable[[int], list[int]]) -> None:
    [todo_id] = new_ids(1)
    project(todo_id, 1)
    for bad in ("0", "-1", "two", "1.5"):
        response = get(client, todo_id, min_version=bad)
        assert response.status_code == 422, bad
