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
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import pytest
import redis
from starlette.testclient import TestClient

from tests.integration.in_process import running_with
from tests.integration.read_model_ids import CREATED, DELETED, UPDATED, todo_data
from tests.integration.settings_override import Run
from todo_cqrs import bootstrap, logs, tracing
from todo_cqrs.adapters.cache import CachedTodo, VersionWatch, todo_key
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.domain.todo import Todo
from todo_cqrs.projection.handlers import Projection, project_event
from todo_cqrs.query.handlers import Queries
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


async def version_watch_ready(watch: VersionWatch) -> None:
    """Until the subscription to the projection's notices answers."""
    deadline = time.monotonic() + DEADLINE_S
    while not await watch.ready():
        assert time.monotonic() < deadline, "the version watch did not subscribe"
        await asyncio.sleep(0.01)


async def version_watch_down(watch: VersionWatch) -> None:
    """Until the subscription is known to be unreachable (readers then poll the read DB)."""
    deadline = time.monotonic() + watch.HEALTHY_WITHIN_S + DEADLINE_S
    while watch.healthy:
        assert time.monotonic() < deadline, "the version watch still claims to be healthy"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def queries(redis_relay: FreezableRelay) -> Queries:
    """get_todos' dependencies, as bootstrap builds them, its Redis reached through the relay."""
    return bootstrap.queries(replace(settings(), redis_url=redis_relay.url))


@pytest.fixture(scope="module")
def client(queries: Queries) -> Iterator[TestClient]:
    """get_todos built with `queries` (after the relay, so it closes first)."""
    with running_with("get_todos", queries) as get_todos:
        get_todos.portal.call(version_watch_ready, queries.watch)
        yield get_todos


AfterRead = Callable[[Projection, tuple[Todo | None, int | None]], Any]


@contextmanager
def reading_through(client: TestClient, queries: Queries, after_read: AfterRead) -> Iterator[None]:
    """get_todos' reads of one todo go through `after_read(projection, row)` for a block: a step of the
    test's own between the read and what the reader does with it, with a projection of its own (another
    process's) on get_todos' loop."""
    store, elsewhere = queries.store, bootstrap.projection(settings())

    class ReadThenStep:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def get(self, todo_id: int) -> tuple[Todo | None, int | None]:
            row = await store.get(todo_id)
            await after_read(elsewhere, row)
            return row

    queries.store = ReadThenStep()
    try:
        yield
    finally:
        queries.store = store
        client.portal.call(elsewhere.aclose)


@pytest.fixture(scope="module")
def raw_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings().redis_url, socket_timeout=2)
    yield client
    client.close()


async def project(projection: Projection, todo_id: int, version: int, **fields: Any) -> dict[str, Any]:
    """Apply a created (version 1) or updated event through the projection; returns the todo."""
    data = todo_data(todo_id, version, **fields)
    await project_event(projection, CREATED if version == 1 else UPDATED, data)
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
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], projection: Projection
) -> None:
    [todo_id] = new_ids(1)
    todo = run(project(projection, todo_id, 1, title="buy milk"))

    first, second = get(client, todo_id), client.get(f"/{todo_id}")

    assert (first.status_code, first.headers["X-Cache"], first.headers["ETag"]) == (200, "miss", '"1"')
    assert (second.status_code, second.headers["X-Cache"], second.headers["ETag"]) == (200, "hit", '"1"')
    assert first.json() == second.json() == todo
    not_modified = client.get(f"/{todo_id}", headers={"If-None-Match": '"1"'})
    assert (not_modified.status_code, not_modified.content) == (304, b"")
    assert (not_modified.headers["ETag"], not_modified.headers["X-Cache"]) == ('"1"', "hit")


def test_unknown_and_deleted_todos_are_404(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], projection: Projection
) -> None:
    never_seen, deleted = new_ids(2)
    run(project(projection, deleted, 1))
    assert get(client, deleted).status_code == 200
    run(project_event(projection, DELETED, {"id": deleted, "version": 2}))
    unknown, gone = get(client, never_seen), get(client, deleted)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")
    assert gone.headers["X-Cache"] == "miss"


def test_projection_invalidates_the_cached_todo(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], projection: Projection
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))
    get(client, todo_id)
    assert get(client, todo_id).headers["X-Cache"] == "hit"

    updated = run(project(projection, todo_id, 2, title="second"))

    after = get(client, todo_id)
    assert (after.headers["X-Cache"], after.json()) == ("miss", updated)
    again = get(client, todo_id)
    assert (again.headers["X-Cache"], again.json()) == ("hit", updated)


# --- the cache never goes back in time ----------------------------------------------------------------


def test_reader_that_loaded_an_old_version_cannot_store_it_after_a_newer_invalidation(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], projection: Projection
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))

    async def race() -> dict[str, Any]:
        cache = projection.cache
        # The reader misses and loads version 1 from the read DB...
        assert await cache.get_todo(todo_id) is None
        loaded, _ = await projection.store.get(todo_id)
        assert loaded is not None and loaded.version == 1
        # ...version 2 is projected and invalidated meanwhile...
        newer = await project(projection, todo_id, 2, title="second")
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
    run: Run[Any], new_ids: Callable[[int], list[int]], raw_redis: redis.Redis, projection: Projection
) -> None:
    [todo_id] = new_ids(1)  # only the cache is used here: the ids keep it apart from everyone's

    async def sequence() -> None:
        cache = projection.cache
        await cache.store_todo(todo_id, 1, b'{"version":1}')
        assert await cache.get_todo(todo_id) == CachedTodo(1, b'{"version":1}')

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
        assert await cache.get_todo(todo_id) == CachedTodo(2, b'{"version":2}')

    run(sequence())


def test_the_race_through_the_handler_leaves_no_stale_entry(
    client: TestClient,
    queries: Queries,
    new_ids: Callable[[int], list[int]],
    run: Run[Any],
    projection: Projection,
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))
    newer: dict[str, Any] = {}

    async def projection_lands(elsewhere: Projection, row: Any) -> None:
        if not newer:  # the projection commits and invalidates between this read and the reader's store
            newer.update(await project(elsewhere, todo_id, 2, title="second"))

    with reading_through(client, queries, projection_lands):
        racing = get(client, todo_id)

    assert (racing.headers["X-Cache"], racing.json()["version"]) == ("miss", 1)  # current when read
    after = get(client, todo_id)
    assert (after.headers["X-Cache"], after.json()) == ("miss", newer)


# --- lists --------------------------------------------------------------------------------------------


def test_list_pages_by_cursor_with_a_status_filter(
    run: Run[Any],
    client: TestClient,
    new_ids: Callable[[int], list[int]],
    projection: Projection,
    queries: Queries,
) -> None:
    ids = new_ids(9)

    async def seed() -> None:
        for n, todo_id in enumerate(ids):
            await project(projection, todo_id, 1)
            if n % 3 != 1:
                await project(projection, todo_id, 2, status="IN_PROGRESS")

    run(seed())
    in_progress = [todo_id for n, todo_id in enumerate(ids) if n % 3 != 1]

    seen: list[int] = []
    cursor: str | None = queries.cursors.encode(ids[0] - 1)
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
    run: Run[Any],
    client: TestClient,
    new_ids: Callable[[int], list[int]],
    projection: Projection,
    queries: Queries,
) -> None:
    ids = new_ids(3)

    async def seed() -> None:
        for todo_id in ids:
            await project(projection, todo_id, 1)

    run(seed())
    page = {"cursor": queries.cursors.encode(ids[0] - 1), "limit": 3}
    get(client, ids[0])
    cached = get_until(client, "/todo", "hit", **page)
    assert cached.headers["X-Cache"] == "hit"
    assert [item["id"] for item in cached.json()["items"]] == ids

    run(project(projection, ids[1], 2, title="renamed"))

    after = client.get("/todo", params=page)
    assert after.headers["X-Cache"] == "miss"
    assert [item["title"] for item in after.json()["items"]] == ["v1", "renamed", "v1"]


# --- Redis unreachable mid-test -----------------------------------------------------------------------


def test_redis_frozen_mid_test_is_bypassed_and_used_again_once_back(
    run: Run[Any],
    client: TestClient,
    redis_relay: FreezableRelay,
    new_ids: Callable[[int], list[int]],
    projection: Projection,
    queries: Queries,
) -> None:
    [todo_id] = new_ids(1)
    todo = run(project(projection, todo_id, 1))
    get(client, todo_id)
    assert get(client, todo_id).headers["X-Cache"] == "hit"
    page = {"cursor": queries.cursors.encode(todo_id - 1), "limit": 1}

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
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], projection: Projection
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))
    updated = run(project(projection, todo_id, 2, title="second"))
    for wanted in (1, 2):
        response = get(client, todo_id, min_version=wanted)
        assert (response.status_code, response.json()) == (200, updated)


def test_min_version_that_never_arrives_is_503_not_yet_consistent(
    run: Run[Any],
    client: TestClient,
    queries: Queries,
    projection: Projection,
    new_ids: Callable[[int], list[int]],
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))
    started = time.monotonic()
    bound, queries.min_version_wait_s = queries.min_version_wait_s, 0.3  # MIN_VERSION_WAIT_SECONDS
    try:
        response = get(client, todo_id, min_version=2)
    finally:
        queries.min_version_wait_s = bound
    assert 0.3 <= time.monotonic() - started < 0.3 + DEADLINE_S
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_yet_consistent"
    assert int(response.headers["Retry-After"]) >= 1


def test_min_version_of_a_deletion_is_404(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], projection: Projection
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))
    run(project_event(projection, DELETED, {"id": todo_id, "version": 2}))
    assert get(client, todo_id, min_version=2).status_code == 404


class ProjectionDuringTheRead:
    """A step after each of get_todos' reads (`reading_through`): records the versions the reader saw, and
    after its first read projects the awaited version from elsewhere (a task of its own, as another
    process would)."""

    def __init__(self, todo_id: int, title: str) -> None:
        self.todo_id, self.title = todo_id, title
        self.reads: list[int | None] = []
        self.record: dict[str, Any] | None = None  # the read's log line
        self.projection: asyncio.Task[dict[str, Any]] | None = None
        self.projection_trace = tracing.TraceContext(uuid.uuid4().hex, uuid.uuid4().hex[:16])

    async def __call__(self, elsewhere: Projection, row: tuple[Todo | None, int | None]) -> None:
        self.reads.append(row[1])
        self.record = logs.current_record()
        if self.projection is None:
            self.projection = asyncio.get_running_loop().create_task(self._project(elsewhere))

    async def settled(self) -> asyncio.Task[dict[str, Any]]:
        """The projection, once it has finished (on the loop it runs on)."""
        assert self.projection is not None, "the reader never read"
        await asyncio.wait([self.projection], timeout=DEADLINE_S)
        assert self.projection.done()
        return self.projection

    async def _project(self, elsewhere: Projection) -> dict[str, Any]:
        with tracing.start_span("projection elsewhere", self.projection_trace) as span:
            self.projection_trace = span.context
            return await project(elsewhere, self.todo_id, 2, title=self.title)


def test_min_version_is_woken_by_the_projections_notice(
    run: Run[Any],
    client: TestClient,
    queries: Queries,
    projection: Projection,
    new_ids: Callable[[int], list[int]],
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))
    get(client, todo_id)
    # Version 1 is cached: not enough for min_version 2.
    assert get(client, todo_id).headers["X-Cache"] == "hit"
    client.portal.call(version_watch_ready, queries.watch)
    reader = ProjectionDuringTheRead(todo_id, f"landed {uuid.uuid4()}")

    with reading_through(client, queries, reader):
        response = get(client, todo_id, min_version=2)
        newer = client.portal.call(reader.settled).result()
    assert (response.status_code, response.json()) == (200, newer)
    assert reader.reads == [1, 2]  # one look before the notice, one after: no polling
    assert reader.record is not None
    assert reader.record["woken_by_trace"] == reader.projection_trace.traceparent
    assert get(client, todo_id).json() == newer


def test_min_version_polls_the_read_model_while_redis_is_unreachable(
    run: Run[Any],
    client: TestClient,
    queries: Queries,
    projection: Projection,
    redis_relay: FreezableRelay,
    new_ids: Callable[[int], list[int]],
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))
    reader = ProjectionDuringTheRead(todo_id, f"landed {uuid.uuid4()}")
    # The projection elsewhere reaches Redis through the relay too: frozen, it cannot invalidate.
    relayed = bootstrap.projection(replace(settings(), redis_url=redis_relay.url))

    async def through_the_relay(elsewhere: Projection, row: tuple[Todo | None, int | None]) -> None:
        await reader(relayed, row)

    with redis_relay.frozen():
        client.portal.call(version_watch_down, queries.watch)
        with reading_through(client, queries, through_the_relay):
            response = get(client, todo_id, min_version=2)
            landed = client.portal.call(reader.settled)
    client.portal.call(relayed.aclose)
    # The projection committed to the read DB, then could not invalidate (it answers 5xx and is retried).
    assert isinstance(landed.exception(), DependencyUnavailable)
    assert (response.status_code, response.headers["X-Cache"]) == (200, "bypass")
    assert response.json() == todo_data(todo_id, 2, title=reader.title)
    assert reader.reads[0] == 1 and reader.reads[-1] == 2
    assert reader.record is not None and "woken_by_trace" not in reader.record
    run(project(projection, todo_id, 2, title=reader.title))  # the projection's retry, now that Redis answers
    client.portal.call(version_watch_ready, queries.watch)


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "+2", "٢", ""])
def test_bad_min_version_is_422(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], bad: str, projection: Projection
) -> None:
    [todo_id] = new_ids(1)
    run(project(projection, todo_id, 1))
    response = get(client, todo_id, min_version=bad)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_failed"
