"""get_todos' bounds (issue 17): a cap on the ?min_version reads that wait in one process, and signed
cursors. With the fake cache, read store and watch of the projection's notices passed in
(tests/unit/fakes_read.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import a_todo, assert_error
from tests.unit.fakes_read import FakeCache, FakeReadStore, FakeVersionWatch
from todo_cqrs import bootstrap
from todo_cqrs.domain.errors import Overloaded, TooManyWaiters, ValidationFailed
from todo_cqrs.domain.todo import Todo
from todo_cqrs.query.handlers import Cursors, Queries, ReadRefused, ReadSlots, Waiters, get_todo
from todo_cqrs.settings import settings

FUNCTION = "get_todos"
DEPS = "queries"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Set settings for one test (settings are cached per process)."""

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        settings.cache_clear()

    yield set_env
    settings.cache_clear()


def body_of(response: Any) -> Any:
    return json.loads(response.content)


# --- the cap on ?min_version waiters -------------------------------------------------------------


def test_waiters_past_the_cap_answer_503_at_once_and_those_below_it_are_served(
    queries: Queries, read_model: FakeReadStore, cache: FakeCache, watch: FakeVersionWatch
) -> None:
    queries.waiters, queries.min_version_wait_s = Waiters(2), 30
    read_model.put(a_todo(7, version=3))

    async def scenario() -> None:
        waiting = [asyncio.create_task(get_todo(queries, 7, 4)) for _ in range(2)]
        while len(watch.waits) < 2:  # both registered with the watch: they wait for the projection
            await asyncio.sleep(0)
        lookups = len(read_model.row_lookups)

        with pytest.raises(ReadRefused) as refused:
            await get_todo(queries, 8, 1)
        assert isinstance(refused.value.error, TooManyWaiters) and refused.value.cache == "miss"
        assert refused.value.error.retry_after_s >= 1
        assert len(read_model.row_lookups) == lookups  # refused before any read of the read DB

        # The projection lands version 4: both waiters are answered with it.
        read_model.put(a_todo(7, version=4))
        await cache.invalidate(7, 4)
        assert [read.version for read in await asyncio.gather(*waiting)] == [4, 4]

        # Their slots are free again: the next read that must wait is served too.
        async def projected() -> None:
            read_model.put(a_todo(8, version=1))
            await cache.invalidate(8, 1)

        watch.land_when_waited(8, projected)
        assert (await get_todo(queries, 8, 1)).version == 1

    asyncio.run(scenario())


def test_a_read_past_the_cap_answers_503_too_many_waiters_with_retry_after(
    client: TestClient, queries: Queries, read_model: FakeReadStore
) -> None:
    queries.waiters = Waiters(0)
    read_model.put(a_todo(7, version=3))

    response = client.get("/7?min_version=4")

    assert_error(response, 503, "too_many_waiters")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["X-Cache"] == "miss"
    assert read_model.row_lookups == []


def test_the_cap_leaves_reads_the_cache_answers_alone(
    client: TestClient, queries: Queries, read_model: FakeReadStore
) -> None:
    queries.waiters = Waiters(0)
    read_model.put(a_todo(7, version=3))
    assert client.get("/7").status_code == 200  # now cached

    response = client.get("/7?min_version=3")

    assert response.status_code == 200
    assert response.headers["X-Cache"] == "hit"


# --- signed cursors ------------------------------------------------------------------------------


@pytest.fixture
def five(read_model: FakeReadStore) -> list[Todo]:
    return [read_model.put(a_todo(i)) for i in (2, 4, 5, 9, 11)]


def first_cursor(client: TestClient) -> str:
    cursor: str = body_of(client.get("/todo", params={"limit": 2}))["next_cursor"]
    return cursor


def cursors_of_a_process() -> Cursors:
    """The cursors of a get_todos process started now, built from its settings as bootstrap builds them."""
    return bootstrap.queries(settings()).cursors


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_an_issued_cursor_is_accepted_by_another_process_with_the_same_secret(
    client: TestClient,
    queries: Queries,
    read_model: FakeReadStore,
    five: list[Todo],
    env: Callable[..., None],
) -> None:
    env(CURSOR_SECRET="shared by every get-todos pod")
    queries.cursors = cursors_of_a_process()
    cursor = first_cursor(client)
    settings.cache_clear()  # as another pod would: its own settings, the same Secret
    queries.cursors = cursors_of_a_process()

    response = client.get("/todo", params={"limit": 2, "cursor": cursor})

    assert response.status_code == 200
    assert [item["id"] for item in body_of(response)["items"]] == [5, 9]
    assert read_model.list_queries[-1] == (None, 4, 3)


def forged_cursors(issued: str) -> list[str]:
    payload, _, tag = issued.partition(".")
    return [
        b64(b"after:4"),  # the unsigned form
        f"{b64(b'after:9')}.{tag}",  # another position under the issued tag
        f"{payload}.{b64(b'x' * 16)}",  # the issued position under a made-up tag
        f"{payload}.{tag[:-2]}",  # a cut tag
        f"{payload}.",
        f"{payload}.{tag}.{tag}",
        "",  # empty, as `limit=` and `status=` (422 too): not a cursor this API gave out
    ]


def test_a_forged_or_altered_cursor_answers_422_and_reaches_neither_db_nor_cache(
    client: TestClient, read_model: FakeReadStore, cache: FakeCache, five: list[Todo]
) -> None:
    issued = first_cursor(client)
    queries, stored = list(read_model.list_queries), list(cache.stored_pages)

    for forged in forged_cursors(issued):
        error = assert_error(client.get("/todo", params={"cursor": forged}), 422, "validation_failed")
        assert [problem["field"] for problem in error["details"]] == ["cursor"], forged

    assert read_model.list_queries == queries
    assert cache.stored_pages == stored


def test_a_cursor_signed_with_another_secret_answers_422(
    client: TestClient,
    queries: Queries,
    read_model: FakeReadStore,
    five: list[Todo],
    env: Callable[..., None],
) -> None:
    env(CURSOR_SECRET="one deployment")
    queries.cursors = cursors_of_a_process()
    cursor = first_cursor(client)
    env(CURSOR_SECRET="another deployment")
    queries.cursors = cursors_of_a_process()

    assert_error(client.get("/todo", params={"cursor": cursor}), 422, "validation_failed")


def test_without_cursor_secret_the_key_is_derived_from_the_db_password_the_pods_share(
    env: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CURSOR_SECRET", raising=False)
    env(DB_PASSWORD="the todo_query secret")
    cursor = cursors_of_a_process().encode(41)
    settings.cache_clear()
    assert cursors_of_a_process().decode(cursor) == 41

    env(DB_PASSWORD="another password")
    with pytest.raises(ValidationFailed):
        cursors_of_a_process().decode(cursor)


def test_reads_past_the_read_db_slots_and_as_many_waiting_answer_503_at_once() -> None:
    """Misses hold the read-DB slots; the excess is refused at once, not queued behind them."""

    async def scenario() -> list[str]:
        slots = ReadSlots(2)
        release = asyncio.Event()
        outcomes: list[str] = []

        async def read(name: str) -> None:
            try:
                async with slots.slot("miss"):
                    outcomes.append(f"{name} read")
                    await release.wait()
            except ReadRefused as refused:
                assert isinstance(refused.error, Overloaded)
                outcomes.append(f"{name} refused {refused.cache}")

        tasks = [asyncio.create_task(read(f"r{i}")) for i in range(5)]
        await asyncio.sleep(0)  # two hold the slots, two wait, the fifth is refused at once
        assert outcomes == ["r0 read", "r1 read", "r4 refused miss"]
        release.set()
        await asyncio.gather(*tasks)
        return outcomes

    assert asyncio.run(scenario()) == ["r0 read", "r1 read", "r4 refused miss", "r2 read", "r3 read"]
