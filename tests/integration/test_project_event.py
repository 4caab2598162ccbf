"""project_event through its functions-framework app, against the real read DB and Redis.

Events are posted the way a KafkaSource delivers them (binary-mode CloudEvents over HTTP; one test uses
structured mode). Todo ids come from a random high range nobody else writes, and every id a test used
ends as a tombstone, so the read model still equals the write model for everyone else afterwards.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
import sqlalchemy as sa
from starlette.testclient import TestClient

from tests.integration.databases import read_db
from tests.integration.in_process import running_with
from tests.integration.read_model_ids import CREATED, DELETED, UPDATED, todo_data
from tests.integration.settings_override import Run
from todo_cqrs import bootstrap
from todo_cqrs.adapters.cache import LIST_GENERATION_KEY, VERSIONS_CHANNEL, todo_key
from todo_cqrs.adapters.read_store import todos_view
from todo_cqrs.projection.handlers import Projection
from todo_cqrs.settings import settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def on_a_closed_port(url: str) -> str:
    """The same URL (user, database) with a port nothing listens on: connections are refused at once."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:1" if userinfo else "127.0.0.1:1"))


@pytest.fixture(scope="module")
def client(function_client: Callable[[str], TestClient]) -> TestClient:
    return function_client("project_event")


@pytest.fixture(scope="module")
def raw_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings().redis_url, socket_timeout=2)
    yield client
    client.close()


# --- events -------------------------------------------------------------------------------------------


def event_data(type_: str, todo_id: int, version: int, **fields: Any) -> dict[str, Any]:
    return {"id": todo_id, "version": version} if type_ == DELETED else todo_data(todo_id, version, **fields)


def post(
    client: TestClient, type_: str, data: Any, *, event_id: str | None = None, **extensions: str
) -> httpx.Response:
    """POST a binary-mode CloudEvent, as the KafkaSource does; data is JSON-encoded unless bytes."""
    subject = str(data.get("id", "")) if isinstance(data, dict) else ""
    headers = {
        **{f"ce-{name}": value for name, value in extensions.items()},
        "ce-specversion": "1.0",
        "ce-id": event_id or str(uuid.uuid4()),
        "ce-source": "/test/project-event",
        "ce-type": type_,
        "ce-subject": subject,
        "ce-time": "2026-11-27T10:01:00.000Z",
        "Content-Type": "application/json",
    }
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return client.post("/", content=body, headers=headers)


def send(client: TestClient, type_: str, todo_id: int, version: int, **fields: Any) -> httpx.Response:
    response = post(client, type_, event_data(type_, todo_id, version, **fields))
    assert 200 <= response.status_code < 300, (response.status_code, response.content)
    return response


def outcome(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["outcome"]


# --- the read model and the cache ---------------------------------------------------------------------


async def read_row(todo_id: int) -> dict[str, Any] | None:
    """The read model's row of a todo (a tombstone too); None when it never saw the todo."""
    async with read_db().autocommitted() as conn:
        row = (await conn.execute(sa.select(todos_view).where(todos_view.c.id == todo_id))).first()
    return dict(row._mapping) if row else None


async def live(todo_id: int) -> tuple[int, str] | None:
    """(version, title) of a live row; None when absent or a tombstone."""
    row = await read_row(todo_id)
    return (row["version"], row["title"]) if row and not row["deleted"] else None


def list_generation(raw_redis: redis.Redis) -> int:
    return int(raw_redis.get(LIST_GENERATION_KEY) or 0)


async def cache_todo(projection: Projection, todo_id: int, version: int, body: bytes) -> None:
    """A reader's entry in the cache, as get_todos stores it."""
    await projection.cache.store_todo(todo_id, version, body)


@contextmanager
def project_event_with(**changed: Any) -> Iterator[TestClient]:
    """Another project_event process, built from the settings with these changed (a dependency on a
    closed port), for a block: the KafkaSource's retry then reaches the module's `client`."""
    with running_with("project_event", bootstrap.projection(replace(settings(), **changed))) as other:
        yield other


@pytest.fixture
def read_db_down() -> Callable[[], AbstractContextManager[TestClient]]:
    """project_event with its read DB on a closed port."""
    return lambda: project_event_with(read_db_url=on_a_closed_port(settings().read_db_url))


@pytest.fixture
def redis_down() -> Callable[[], AbstractContextManager[TestClient]]:
    """project_event with its Redis on a closed port."""
    return lambda: project_event_with(redis_url=on_a_closed_port(settings().redis_url))


# --- applying -----------------------------------------------------------------------------------------


def test_created_event_is_applied(run: Run[Any], client: TestClient, new_id: Callable[[], int]) -> None:
    todo_id = new_id()
    data = todo_data(todo_id, 1, title="buy milk", description="two litres")
    response = post(client, CREATED, data)
    assert outcome(response) == (200, "applied")
    row = run(read_row(todo_id))
    assert row is not None
    assert (row["title"], row["description"], row["status"], row["version"], row["deleted"]) == (
        "buy milk", "two litres", "CREATED", 1, False
    )  # fmt: skip
    assert row["updated_at"].isoformat(timespec="milliseconds") == "2026-11-27T10:00:01.000"


def test_structured_mode_event_is_applied(
    run: Run[Any], client: TestClient, new_id: Callable[[], int]
) -> None:
    todo_id = new_id()
    event = {
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "/test/project-event", "type": CREATED,
        "subject": str(todo_id), "datacontenttype": "application/json", "data": todo_data(todo_id, 1),
    }  # fmt: skip
    response = client.post(
        "/", content=json.dumps(event), headers={"Content-Type": "application/cloudevents+json"}
    )
    assert outcome(response) == (200, "applied"), response.content
    assert run(live(todo_id)) == (1, "v1")


def test_update_is_applied(run: Run[Any], client: TestClient, new_id: Callable[[], int]) -> None:
    todo_id = new_id()
    send(client, CREATED, todo_id, 1)
    assert outcome(send(client, UPDATED, todo_id, 2, title="renamed", status="FINISHED")) == (200, "applied")
    row = run(read_row(todo_id))
    assert row is not None
    assert (row["version"], row["title"], row["status"]) == (2, "renamed", "FINISHED")


def test_duplicate_event_answers_2xx_and_changes_nothing(
    run: Run[Any], client: TestClient, new_id: Callable[[], int]
) -> None:
    todo_id = new_id()
    send(client, CREATED, todo_id, 1)
    event_id, data = str(uuid.uuid4()), todo_data(todo_id, 2, title="second")
    assert post(client, UPDATED, data, event_id=event_id).status_code // 100 == 2
    before = run(read_row(todo_id))

    redelivered = post(client, UPDATED, data, event_id=event_id)
    # The same version with other content is still a duplicate: the version decides, not the payload.
    same_version = post(client, UPDATED, {**data, "title": "not this"})

    assert (outcome(redelivered), outcome(same_version)) == ((200, "skipped"), (200, "skipped"))
    assert run(read_row(todo_id)) == before
    assert run(live(todo_id)) == (2, "second")


def test_older_version_answers_2xx_and_changes_nothing(
    run: Run[Any], client: TestClient, new_id: Callable[[], int]
) -> None:
    todo_id = new_id()
    send(client, CREATED, todo_id, 1)
    send(client, UPDATED, todo_id, 2, title="newer")
    send(client, UPDATED, todo_id, 3, title="newest")
    before = run(read_row(todo_id))
    assert outcome(send(client, UPDATED, todo_id, 2, title="stale")) == (200, "skipped")
    assert outcome(send(client, CREATED, todo_id, 1, title="very stale")) == (200, "skipped")
    assert run(read_row(todo_id)) == before


def test_out_of_order_events_keep_the_newest(
    run: Run[Any], client: TestClient, new_id: Callable[[], int]
) -> None:
    todo_id = new_id()
    send(client, UPDATED, todo_id, 3, title="third")
    send(client, UPDATED, todo_id, 2, title="second")
    send(client, CREATED, todo_id, 1, title="first")
    assert run(live(todo_id)) == (3, "third")


def test_events_delivered_together_are_applied_together_and_keep_the_newest_of_each_todo(
    run: Run[Any], client: TestClient, new_ids: Callable[[int], list[int]], raw_redis: redis.Redis
) -> None:
    """As a KafkaSource with ordering `unordered` delivers: many events in flight at once, one todo's
    versions in any order, a deletion among them. Each todo ends at its newest version, each event is
    applied at most once, and each todo's newest version is the one its invalidations announce."""
    todo_ids = new_ids(3)
    events = [
        (CREATED if version == 1 else UPDATED, todo_id, version)
        for todo_id in todo_ids
        for version in range(1, 9)
    ]
    events.append((DELETED, todo_ids[2], 9))
    random.Random(7).shuffle(events)
    with ThreadPoolExecutor(len(events)) as pool:
        answers = list(pool.map(lambda e: send(client, e[0], e[1], e[2], title=f"v{e[2]}"), events))
    assert all(answer.status_code == 200 for answer in answers)
    applied = [
        event for event, answer in zip(events, answers, strict=True) if outcome(answer)[1] == "applied"
    ]
    assert len(applied) == len(set(applied))
    assert {(todo_id, version) for _, todo_id, version in applied} >= {
        (todo_ids[0], 8),
        (todo_ids[1], 8),
        (todo_ids[2], 9),
    }
    assert run(live(todo_ids[0])) == (8, "v8")
    assert run(live(todo_ids[1])) == (8, "v8")
    assert run(live(todo_ids[2])) is None
    assert run(read_row(todo_ids[2]))["version"] == 9  # a tombstone
    for todo_id, newest in zip(todo_ids, (8, 8, 9), strict=True):
        assert raw_redis.get(todo_key(todo_id)).startswith(f"{newest}:".encode())


def test_late_update_does_not_resurrect_a_deleted_todo(
    run: Run[Any], client: TestClient, new_id: Callable[[], int]
) -> None:
    todo_id = new_id()
    send(client, CREATED, todo_id, 1)
    send(client, DELETED, todo_id, 3)
    assert outcome(send(client, UPDATED, todo_id, 2, title="late")) == (200, "skipped")
    row = run(read_row(todo_id))
    assert row is not None
    assert (row["deleted"], row["version"]) == (True, 3)


def test_created_arriving_after_deleted_stays_deleted(
    run: Run[Any], client: TestClient, new_id: Callable[[], int]
) -> None:
    todo_id = new_id()
    send(client, DELETED, todo_id, 2)
    send(client, CREATED, todo_id, 1)
    row = run(read_row(todo_id))
    assert row is not None
    assert (row["deleted"], row["version"]) == (True, 2)


def test_deletion_tombstone_is_stamped_with_the_event_time(
    run: Run[Any], client: TestClient, new_id: Callable[[], int]
) -> None:
    todo_id = new_id()
    send(client, CREATED, todo_id, 1)
    send(client, DELETED, todo_id, 2)  # post() sends ce-time 2026-11-27T10:01:00.000Z
    row = run(read_row(todo_id))
    assert row is not None
    assert row["updated_at"].isoformat(timespec="milliseconds") == "2026-11-27T10:01:00.000"


# --- events that can never be applied -----------------------------------------------------------------


def test_request_that_is_not_a_cloud_event_is_400(
    run: Run[Any], client: TestClient, new_id: Callable[[], int]
) -> None:
    todo_id = new_id()
    response = client.post("/", json=todo_data(todo_id, 1))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_event"
    assert run(read_row(todo_id)) is None


@pytest.mark.parametrize(
    ("type_", "make_data"),
    [
        ("todo.renamed.v1", lambda i: todo_data(i, 1)),
        (CREATED, lambda i: {k: v for k, v in todo_data(i, 1).items() if k != "id"}),
        (UPDATED, lambda i: {k: v for k, v in todo_data(i, 2).items() if k != "version"}),
        (DELETED, lambda i: {"id": i}),
        (UPDATED, lambda i: todo_data(i, 0)),
        (UPDATED, lambda i: {**todo_data(i, 2), "version": "2"}),
        (CREATED, lambda i: {"id": i, "version": 1}),
        (CREATED, lambda i: todo_data(i, 1, status="DONE")),
        (CREATED, lambda i: b"{not json"),
        (CREATED, lambda i: [todo_data(i, 1)]),
    ],
    ids=[
        "unknown-type",
        "no-id",
        "no-version",
        "deleted-without-version",
        "version-zero",
        "version-string",
        "not-a-whole-todo",
        "unknown-status",
        "data-not-json",
        "data-not-an-object",
    ],
)
def test_event_that_can_never_be_applied_is_400(
    run: Run[Any], client: TestClient, new_id: Callable[[], int], type_: str, make_data: Callable[[int], Any]
) -> None:
    todo_id = new_id()
    response = post(client, type_, make_data(todo_id))
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_event"
    assert run(read_row(todo_id)) is None


# --- dependencies down --------------------------------------------------------------------------------


def test_read_db_down_is_5xx_and_the_retry_applies(
    run: Run[Any],
    client: TestClient,
    new_id: Callable[[], int],
    read_db_down: Callable[[], AbstractContextManager[TestClient]],
) -> None:
    todo_id = new_id()
    data = todo_data(todo_id, 1)
    with read_db_down() as down:
        started = time.monotonic()
        response = post(down, CREATED, data)
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "dependency_unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert elapsed < 2 * settings().db_timeout_s + 1
    assert run(read_row(todo_id)) is None

    assert outcome(post(client, CREATED, data)) == (200, "applied")  # the KafkaSource's retry
    assert run(live(todo_id)) == (1, "v1")


def test_redis_down_is_5xx_after_applying_and_the_retry_invalidates(
    run: Run[Any],
    client: TestClient,
    new_id: Callable[[], int],
    raw_redis: redis.Redis,
    redis_down: Callable[[], AbstractContextManager[TestClient]],
    projection: Projection,
) -> None:
    todo_id = new_id()
    send(client, CREATED, todo_id, 1)
    run(cache_todo(projection, todo_id, 1, b'{"cached":1}'))
    data = todo_data(todo_id, 2, title="while redis was down")
    with redis_down() as down:
        response = post(down, UPDATED, data)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "dependency_unavailable"
    assert run(live(todo_id)) == (2, "while redis was down")  # committed before the invalidation failed
    assert raw_redis.get(todo_key(todo_id)) == b'1:t:{"cached":1}'  # still stale: hence the 5xx

    generation = list_generation(raw_redis)
    assert outcome(post(client, UPDATED, data)) == (200, "skipped")  # the retry, a duplicate by now
    assert raw_redis.get(todo_key(todo_id)) == b"2:i:"
    assert list_generation(raw_redis) > generation
    assert run(live(todo_id)) == (2, "while redis was down")


# --- invalidation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cached_version", "event_version", "marker"),
    [(1, 2, b"2:i:"), (2, 2, b"2:i:"), (3, 2, b"3:i:")],
    ids=["newer", "duplicate", "older"],
)
def test_every_accepted_event_invalidates_the_todo_and_the_lists(
    run: Run[Any],
    client: TestClient,
    new_id: Callable[[], int],
    raw_redis: redis.Redis,
    cached_version: int,
    event_version: int,
    marker: bytes,
    projection: Projection,
) -> None:
    todo_id = new_id()
    send(client, UPDATED, todo_id, cached_version)
    run(cache_todo(projection, todo_id, cached_version, b"{}"))
    assert raw_redis.get(todo_key(todo_id)) == f"{cached_version}:t:{{}}".encode()
    generation = list_generation(raw_redis)

    send(client, UPDATED, todo_id, event_version)

    # A marker, never an older version: a reader that loaded an older row cannot store it any more.
    assert raw_redis.get(todo_key(todo_id)) == marker
    assert list_generation(raw_redis) > generation


def test_accepted_event_tells_waiting_readers_its_version_and_trace(
    client: TestClient, new_id: Callable[[], int], raw_redis: redis.Redis
) -> None:
    todo_id = new_id()
    notices = raw_redis.pubsub()
    notices.subscribe(VERSIONS_CHANNEL)
    try:
        subscribed = notices.get_message(timeout=1)
        assert subscribed is not None and subscribed["type"] == "subscribe"
        send(client, CREATED, todo_id, 1)
        response = post(client, UPDATED, todo_data(todo_id, 2), traceparent=TRACEPARENT)
        assert outcome(response) == (200, "applied")
        received: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(received) < 2 and time.monotonic() < deadline:
            message = notices.get_message(timeout=0.5)
            if message is not None and message["data"].startswith(f"{todo_id}:".encode()):
                received.append(message["data"])
    finally:
        notices.close()
    assert len(received) == 2, received
    first, second = (notice.split(b":", 2) for notice in received)
    assert first[:2] == [str(todo_id).encode(), b"1"]
    # project_event goes on with the command's trace: its own span, under the event's trace id.
    assert second[:2] == [str(todo_id).encode(), b"2"]
    assert second[2].decode().split("-")[1] == TRACEPARENT.split("-")[1]


def test_rejected_event_invalidates_nothing(
    run: Run[Any],
    client: TestClient,
    new_id: Callable[[], int],
    raw_redis: redis.Redis,
    projection: Projection,
) -> None:
    todo_id = new_id()
    send(client, CREATED, todo_id, 1)
    run(cache_todo(projection, todo_id, 1, b"{}"))
    generation = list_generation(raw_redis)
    assert post(client, CREATED, {"id": todo_id}).status_code == 400
    assert raw_redis.get(todo_key(todo_id)) == b"1:t:{}"
    assert list_generation(raw_redis) == generation
