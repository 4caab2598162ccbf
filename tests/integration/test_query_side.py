"""get_todos on the real Redis and read DB; the read model is seeded through the projection, as in production.

Todo ids come from a random high range nobody else writes, and each ends as a tombstone. Lists show every
live todo, so list tests start from a cursor just before their own ids and assert only about those.

get_todos reaches Redis through a relay of this module's own that can freeze (connections stay open,
nothing passes, as when Redis is paused), so a test can make Redis unreachable for get_todos alone
without pausing the Redis that others share.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import pytest
import redis
from starlette.testclient import TestClient

from tests.integration.read_model_ids import CREATED, DELETED, UPDATED, todo_data
from tests.integration.settings_override import InLoop, Run, overridden_setting
from todo_cqrs import logs, tracing
from todo_cqrs.adapters import cache as cache_module
from todo_cqrs.adapters.cache import todo_key, version_watch
from todo_cqrs.adapters.read_store import get_row, read_connection
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.projection.handlers import project_event
from todo_cqrs.query import handlers as query_handlers
from todo_cqrs.settings import settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

DEADLINE_S = 5.0


class FreezableRelay:
    """A TCP relay to Redis. Frozen, it accepts connections and takes bytes but passes nothing on, in
    either direction, as a paused (SIGSTOP) Redis would; thawed, what it held goes through."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        self.url = urlunsplit(parts._replace(netloc=netloc))
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        self._flowing.clear()
        try:
            yield
        finally:
            self._flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
                upstream = socket.create_connection(self._upstream, timeout=2)
            except OSError:
                return  # closed
            upstream.settimeout(None)
            self._sockets += [downstream, upstream]
            for source, target in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._flowing.wait()
                target.sendall(data)
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._flowing.set()
        self._listener.close()
        for end in self._sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


@pytest.fixture(scope="module")
def redis_relay() -> Iterator[FreezableRelay]:
    relay = FreezableRelay(settings().redis_url)
    yield relay
    relay.close()


async def version_watch_ready() -> None:
    """Until this loop's subscription to the projection's notices answers."""
    watch = version_watch()
    deadline = time.monotonic() + DEADLINE_S
    while not await watch.ready():
        assert time.monotonic() < deadline, "the version watch did not subscribe"
        await asyncio.sleep(0.01)


async def version_watch_down() -> None:
    """Until this loop's subscription is known to be unreachable (readers then poll the read DB)."""
    watch = version_watch()
    deadline = time.monotonic() + watch.HEALTHY_WITHIN_S + DEADLINE_S
    while watch.healthy:
        assert time.monotonic() < deadline, "the version watch still claims to be healthy"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def client(
    redis_relay: FreezableRelay, function_client: Callable[[str], TestClient], in_runner: InLoop
) -> Iterator[TestClient]:
    """get_todos, whose Redis connections go through the relay (set up first, so it closes last)."""
    get_todos = function_client("get_todos")
    loops = [get_todos.portal.call, in_runner]
    with overridden_setting("REDIS_URL", redis_relay.url, cache_module.todo_cache, loops=loops):
        get_todos.portal.call(version_watch_ready)
        yield get_todos


@pytest.fixture(scope="module")
def raw_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings().redis_url, socket_timeout=2)
    yield client
    client.close()


async def project(todo_id: int, version: int, **fields: Any) -> dict[str, Any]:
    """Apply a created (version 1) or updated event through the projection; returns the todo."""
    data = todo_data(todo_id, version, **fields)
    await project_event(CREATED if version == 1 else UPDATED, data)
    return data


def get(client: TestClient, todo_id: int, **params: Any) -> httpx.Response:
    return client.get(f"/todo/{todo_id}", params=params)


def get_until(client: TestClient, path: str, cache_state: str, **params: Any) -> httpx.Response:
    """GET until X-Cache is cache_state (others' projections retire cached lists at any time)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        response = client.get(path, params=params)
        if response.headers["X-Cache"] == cache_state or time.monotonic() > deadline:
            return response


# --- one todo: hit, miss, 304, 404 --------------------------------------------------------------------


def test_first_read_misses_then_hits(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    todo = run(project(todo_id, 1, title="buy milk"))

    first, second = get(client, todo_id), client.get(f"/{todo_id}")

    assert (first.status_code, first.headers["X-Cache"], first.headers["ETag"]) == (200, "miss", '"1"')
    assert (second.status_code, second.headers["X-Cache"], second.headers["ETag"]) == (200, "hit", '"1"')
    assert first.json() == second.json() == todo
    not_modified = client.get(f"/{todo_id}", headers={"If-None-Match": '"1"'})
    assert (not_modified.status_code, not_modified.content) == (304, b"")
    assert (not_modified.headers["ETag"], not_modified.headers["X-Cache"]) == ('"1"', "hit")


def test_unknown_and_deleted_todos_are_404(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    never_seen, deleted = new_ids(2)
    run(project(deleted, 1))
    assert get(client, deleted).status_code == 200
    run(project_event(DELETED, {"id": deleted, "version": 2}))
    unknown, gone = get(client, never_seen), get(client, deleted)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")
    assert gone.headers["X-Cache"] == "miss"


def test_projection_invalidates_the_cached_todo(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))
    get(client, todo_id)
    assert get(client, todo_id).headers["X-Cache"] == "hit"

    updated = run(project(todo_id, 2, title="second"))

    after = get(client, todo_id)
    assert (after.headers["X-Cache"], after.json()) == ("miss", updated)
    again = get(client, todo_id)
    assert (again.headers["X-Cache"], again.json()) == ("hit", updated)


# --- the cache never goes back in time ----------------------------------------------------------------


def test_reader_that_loaded_an_old_version_cannot_store_it_after_a_newer_invalidation(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))

    async def race() -> dict[str, Any]:
        cache = cache_module.todo_cache()
        # The reader misses and loads version 1 from the read DB...
        assert await cache.get_todo(todo_id) is None
        async with read_connection() as conn:
            loaded, _ = await get_row(conn, todo_id)
        assert loaded is not None and loaded.version == 1
        # ...version 2 is projected and invalidated meanwhile...
        newer = await project(todo_id, 2, title="second")
        # ...and only then does the reader store what it loaded.
        await cache.store_todo(todo_id, 1, orjson.dumps(loaded.to_dict()))
        assert await cache.get_todo(todo_id) is None
        return newer

    newer = run(race())
    after = get(client, todo_id)
    assert (after.headers["X-Cache"], after.json()) == ("miss", newer)
    again = get(client, todo_id)
    assert (again.headers["X-Cache"], again.json()) == ("hit", newer)


def test_store_invalidate_stale_store_keeps_the_marker(
    run: Run[Any], new_ids: Callable[[int], list[int]], raw_redis: redis.Redis
) -> None:
    [todo_id] = new_ids(1)  # only the cache is used here: the ids keep it apart from everyone's

    async def sequence() -> None:
        cache = cache_module.todo_cache()
        await cache.store_todo(todo_id, 1, b'{"version":1}')
        assert await cache.get_todo(todo_id) == cache_module.CachedTodo(1, b'{"version":1}')

        await cache.invalidate(todo_id, 2)
        await cache.store_todo(todo_id, 1, b'{"version":1}')
        assert await cache.get_todo(todo_id) is None
        assert raw_redis.get(todo_key(todo_id)) == b"2:i:"

        await cache.store_todo(todo_id, 2, b'{"version":2}')
        await cache.store_todo(todo_id, 1, b'{"version":1}')
        await cache.invalidate(todo_id, 1)  # a late invalidation of an older version keeps the newer floor
        await cache.store_todo(todo_id, 1, b'{"version":1}')
        assert raw_redis.get(todo_key(todo_id)) == b"2:i:"
        await cache.store_todo(todo_id, 2, b'{"version":2}')
        assert await cache.get_todo(todo_id) == cache_module.CachedTodo(2, b'{"version":2}')

    run(sequence())


def test_the_race_through_the_handler_leaves_no_stale_entry(
    client: TestClient, new_ids: Callable[[int], list[int]], run: Run[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))
    newer: dict[str, Any] = {}

    async def get_row_then_projection_lands(conn: Any, wanted: int) -> Any:
        row = await get_row(conn, wanted)
        if not newer:  # the projection commits and invalidates between this read and the reader's store
            newer.update(await project(todo_id, 2, title="second"))
        return row

    monkeypatch.setattr(query_handlers, "get_row", get_row_then_projection_lands)
    racing = get(client, todo_id)
    monkeypatch.undo()

    assert (racing.headers["X-Cache"], racing.json()["version"]) == ("miss", 1)  # current when read
    after = get(client, todo_id)
    assert (after.headers["X-Cache"], after.json()) == ("miss", newer)


# --- lists --------------------------------------------------------------------------------------------


def test_list_pages_by_cursor_with_a_status_filter(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    ids = new_ids(9)

    async def seed() -> None:
        for n, todo_id in enumerate(ids):
            await project(todo_id, 1)
            if n % 3 != 1:
                await project(todo_id, 2, status="IN_PROGRESS")

    run(seed())
    in_progress = [todo_id for n, todo_id in enumerate(ids) if n % 3 != 1]

    seen: list[int] = []
    cursor: str | None = query_handlers.encode_cursor(ids[0] - 1)
    pages = 0
    while cursor is not None and (not seen or seen[-1] < ids[-1]):
        response = client.get("/todo", params={"status": "IN_PROGRESS", "limit": 2, "cursor": cursor})
        assert response.status_code == 200, response.json()
        page = response.json()
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
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    ids = new_ids(3)

    async def seed() -> None:
        for todo_id in ids:
            await project(todo_id, 1)

    run(seed())
    page = {"cursor": query_handlers.encode_cursor(ids[0] - 1), "limit": 3}
    get(client, ids[0])
    cached = get_until(client, "/todo", "hit", **page)
    assert cached.headers["X-Cache"] == "hit"
    assert [item["id"] for item in cached.json()["items"]] == ids

    run(project(ids[1], 2, title="renamed"))

    after = client.get("/todo", params=page)
    assert after.headers["X-Cache"] == "miss"
    assert [item["title"] for item in after.json()["items"]] == ["v1", "renamed", "v1"]


# --- Redis unreachable mid-test -----------------------------------------------------------------------


def test_redis_frozen_mid_test_is_bypassed_and_used_again_once_back(
    run: Run[Any], client: TestClient, redis_relay: FreezableRelay, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    todo = run(project(todo_id, 1))
    get(client, todo_id)
    assert get(client, todo_id).headers["X-Cache"] == "hit"
    page = {"cursor": query_handlers.encode_cursor(todo_id - 1), "limit": 1}

    with redis_relay.frozen():
        one, listed = get(client, todo_id), client.get("/todo", params=page)
        assert (one.status_code, one.headers["X-Cache"], one.json()) == (200, "bypass", todo)
        assert (listed.status_code, listed.headers["X-Cache"]) == (200, "bypass")
        assert listed.json()["items"] == [todo]

    # Back: reads use Redis again once the short breaker after the failure has passed.
    deadline = time.monotonic() + DEADLINE_S
    while (state := get(client, todo_id).headers["X-Cache"]) == "bypass" and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the breaker, not waiting in its place
    assert state in ("hit", "miss")
    assert get(client, todo_id).headers["X-Cache"] == "hit"


# --- min_version: read-your-writes --------------------------------------------------------------------


def test_min_version_already_projected_answers_at_once(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))
    updated = run(project(todo_id, 2, title="second"))
    for wanted in (1, 2):
        response = get(client, todo_id, min_version=wanted)
        assert (response.status_code, response.json()) == (200, updated)


def test_min_version_that_never_arrives_is_503_not_yet_consistent(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))
    started = time.monotonic()
    with overridden_setting("MIN_VERSION_WAIT_SECONDS", "0.3"):
        response = get(client, todo_id, min_version=2)
    assert 0.3 <= time.monotonic() - started < 0.3 + DEADLINE_S
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_yet_consistent"
    assert int(response.headers["Retry-After"]) >= 1


def test_min_version_of_a_deletion_is_404(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))
    run(project_event(DELETED, {"id": todo_id, "version": 2}))
    assert get(client, todo_id, min_version=2).status_code == 404


class ProjectionDuringTheRead:
    """Stands in for get_row in get_todos: records the versions the reader saw, and after its first read
    projects the awaited version from elsewhere (a task of its own, as another process would)."""

    def __init__(self, todo_id: int, title: str) -> None:
        self.todo_id, self.title = todo_id, title
        self.reads: list[int | None] = []
        self.record: dict[str, Any] | None = None  # the read's log line
        self.projection: asyncio.Task[dict[str, Any]] | None = None
        self.projection_trace = tracing.TraceContext(uuid.uuid4().hex, uuid.uuid4().hex[:16])

    async def __call__(self, conn: Any, wanted: int) -> Any:
        row = await get_row(conn, wanted)
        self.reads.append(row[1])
        self.record = logs.current_record()
        if self.projection is None:
            self.projection = asyncio.get_running_loop().create_task(self._project())
        return row

    async def settled(self) -> asyncio.Task[dict[str, Any]]:
        """The projection, once it has finished (on the loop it runs on)."""
        assert self.projection is not None, "the reader never read"
        await asyncio.wait([self.projection], timeout=DEADLINE_S)
        assert self.projection.done()
        return self.projection

    async def _project(self) -> dict[str, Any]:
        with tracing.start_span("projection elsewhere", self.projection_trace) as span:
            self.projection_trace = span.context
            return await project(self.todo_id, 2, title=self.title)


def test_min_version_is_woken_by_the_projections_notice(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))
    get(client, todo_id)
    # Version 1 is cached: not enough for min_version 2.
    assert get(client, todo_id).headers["X-Cache"] == "hit"
    client.portal.call(version_watch_ready)
    reader = ProjectionDuringTheRead(todo_id, f"landed {uuid.uuid4()}")

    monkeypatch.setattr(query_handlers, "get_row", reader)
    response = get(client, todo_id, min_version=2)
    monkeypatch.undo()

    newer = client.portal.call(reader.settled).result()
    assert (response.status_code, response.json()) == (200, newer)
    assert reader.reads == [1, 2]  # one look before the notice, one after: no polling
    assert reader.record is not None
    assert reader.record["woken_by_trace"] == reader.projection_trace.traceparent
    assert get(client, todo_id).json() == newer


def test_min_version_polls_the_read_model_while_redis_is_unreachable(
    run: Run[Any],
    client: TestClient,
    redis_relay: FreezableRelay,
    new_ids: Callable[[int], list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))
    reader = ProjectionDuringTheRead(todo_id, f"landed {uuid.uuid4()}")

    with redis_relay.frozen():
        client.portal.call(version_watch_down)
        monkeypatch.setattr(query_handlers, "get_row", reader)
        response = get(client, todo_id, min_version=2)
        monkeypatch.undo()

        projection = client.portal.call(reader.settled)
    # The projection committed to the read DB, then could not invalidate (it answers 5xx and is retried).
    assert isinstance(projection.exception(), DependencyUnavailable)
    assert (response.status_code, response.headers["X-Cache"]) == (200, "bypass")
    assert response.json() == todo_data(todo_id, 2, title=reader.title)
    assert reader.reads[0] == 1 and reader.reads[-1] == 2
    assert reader.record is not None and "woken_by_trace" not in reader.record
    run(project(todo_id, 2, title=reader.title))  # the projection's retry, now that Redis answers
    client.portal.call(version_watch_ready)


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "+2", "٢", ""])
def test_bad_min_version_is_422(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], bad: str
) -> None:
    [todo_id] = new_ids(1)
    run(project(todo_id, 1))
    response = get(client, todo_id, min_version=bad)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_failed"
