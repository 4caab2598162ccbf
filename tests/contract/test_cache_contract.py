"""The cache's contract: the same cases against the in-memory fakes the unit tests use
(tests/unit/fakes_read.FakeCache and FakeVersionWatch) and the Redis adapters
(todo_cqrs/adapters/cache.TodoCache and VersionWatch, as bootstrap builds them for get_todos).

What the unit tests lean on: a cached read never goes back in time (an invalidation leaves a floor no
older version may be stored under, whatever the order of stores and invalidations), a cached page is
retired by any invalidation, a Redis that is down is bypassed by readers and fails the projection's
invalidation, and an invalidation's notice wakes the readers waiting for that version or an older one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from tests.unit.fakes_read import FakeCache, FakeVersionWatch
from todo_cqrs import bootstrap
from todo_cqrs.adapters.cache import CachedTodo, CacheUnavailable
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.settings import settings

DEADLINE_S = 5.0
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Subject:
    """A cache and the watch of its notices under test, and the loop their calls run on."""

    cache: Any
    watch: Any
    loop: asyncio.Runner

    def run(self, call: Any) -> Any:
        return self.loop.run(call)


@pytest.fixture(params=["fake", "redis"])
def subject(request: pytest.FixtureRequest, loop: asyncio.Runner) -> Iterator[Subject]:
    if request.param == "fake":
        watch = FakeVersionWatch()
        yield Subject(FakeCache(watch=watch), watch, loop)
        return
    request.getfixturevalue("services")
    queries = bootstrap.queries(settings())
    try:
        yield Subject(queries.cache, queries.watch, loop)
    finally:
        loop.run(queries.aclose())


# --- one todo ------------------------------------------------------------------------------------------


def test_an_absent_todo_is_a_miss_and_a_stored_one_a_hit(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)
    assert subject.run(subject.cache.get_todo(todo_id)) is None

    subject.run(subject.cache.store_todo(todo_id, 3, b'{"version":3}'))

    assert subject.run(subject.cache.get_todo(todo_id)) == CachedTodo(3, b'{"version":3}')


def test_a_store_never_replaces_a_newer_entry_and_a_newer_store_replaces_an_older_one(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)
    subject.run(subject.cache.store_todo(todo_id, 2, b"v2"))

    subject.run(subject.cache.store_todo(todo_id, 1, b"v1"))
    assert subject.run(subject.cache.get_todo(todo_id)) == CachedTodo(2, b"v2")

    subject.run(subject.cache.store_todo(todo_id, 3, b"v3"))
    assert subject.run(subject.cache.get_todo(todo_id)) == CachedTodo(3, b"v3")


def test_an_invalidation_drops_the_entry_and_only_its_version_or_newer_may_be_stored(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)
    subject.run(subject.cache.store_todo(todo_id, 1, b"v1"))

    subject.run(subject.cache.invalidate(todo_id, 2))

    assert subject.run(subject.cache.get_todo(todo_id)) is None
    subject.run(subject.cache.store_todo(todo_id, 1, b"v1"))  # a reader that loaded version 1 earlier
    assert subject.run(subject.cache.get_todo(todo_id)) is None
    subject.run(subject.cache.store_todo(todo_id, 2, b"v2"))
    assert subject.run(subject.cache.get_todo(todo_id)) == CachedTodo(2, b"v2")


def test_a_late_invalidation_of_an_older_version_keeps_the_newer_floor(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)
    subject.run(subject.cache.store_todo(todo_id, 2, b"v2"))

    subject.run(subject.cache.invalidate(todo_id, 1))

    subject.run(subject.cache.store_todo(todo_id, 1, b"v1"))
    assert subject.run(subject.cache.get_todo(todo_id)) is None
    subject.run(subject.cache.store_todo(todo_id, 2, b"v2"))
    assert subject.run(subject.cache.get_todo(todo_id)) == CachedTodo(2, b"v2")


def test_invalidating_many_is_invalidating_each(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    first, second = fresh_ids(2)
    for todo_id in (first, second):
        subject.run(subject.cache.store_todo(todo_id, 1, b"v1"))

    subject.run(subject.cache.invalidate_many([(first, 2, None), (second, 3, TRACEPARENT)]))

    for todo_id, floor in ((first, 2), (second, 3)):
        assert subject.run(subject.cache.get_todo(todo_id)) is None
        subject.run(subject.cache.store_todo(todo_id, floor - 1, b"older"))
        assert subject.run(subject.cache.get_todo(todo_id)) is None
        subject.run(subject.cache.store_todo(todo_id, floor, b"floor"))
        assert subject.run(subject.cache.get_todo(todo_id)) == CachedTodo(floor, b"floor")


# --- pages ---------------------------------------------------------------------------------------------


def test_a_page_is_served_under_its_generation_until_any_invalidation_retires_it(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)
    page = f"*:{todo_id}:3"
    generation, cached = subject.run(subject.cache.get_list(page))
    assert cached is None

    subject.run(subject.cache.store_list(generation, page, b'{"items":[]}'))
    assert subject.run(subject.cache.get_list(page)) == (generation, b'{"items":[]}')

    subject.run(subject.cache.invalidate(todo_id, 1))
    retired, cached = subject.run(subject.cache.get_list(page))
    assert cached is None and retired != generation
    # A reader that read the old generation before the invalidation stores its page where nobody reads.
    subject.run(subject.cache.store_list(generation, page, b'{"items":["stale"]}'))
    assert subject.run(subject.cache.get_list(page))[1] is None


# --- Redis down ----------------------------------------------------------------------------------------


@pytest.fixture(params=["fake", "redis"])
def unreachable(request: pytest.FixtureRequest, loop: asyncio.Runner) -> Iterator[Any]:
    """A cache whose Redis does not answer: the fake's flag, or Redis at a closed port."""
    if request.param == "fake":
        yield FakeCache(unreachable=True)
        return
    cache = bootstrap.todo_cache(replace(settings(), redis_url="redis://127.0.0.1:1/0"))
    try:
        yield cache
    finally:
        loop.run(cache.aclose())


def test_a_redis_that_is_down_is_bypassed_by_reads_and_stores_and_fails_invalidations(
    unreachable: Any, loop: asyncio.Runner
) -> None:
    for read in (lambda: unreachable.get_todo(7), lambda: unreachable.get_list("*:0:20")):
        with pytest.raises(CacheUnavailable):
            loop.run(read())
    loop.run(unreachable.store_todo(7, 1, b"v1"))  # a lost store only costs a later miss
    loop.run(unreachable.store_list(b"0", "*:0:20", b"{}"))
    for invalidation in (
        lambda: unreachable.invalidate(7, 1),
        lambda: unreachable.invalidate_many([(7, 1, None), (8, 1, None)]),
    ):
        with pytest.raises(DependencyUnavailable):
            loop.run(invalidation())


# --- the notices that wake ?min_version readers --------------------------------------------------------


async def watching(watch: Any) -> None:
    """Until the watch relies on notices (the real one has subscribed)."""
    deadline = time.monotonic() + DEADLINE_S
    while not await watch.ready():
        assert time.monotonic() < deadline, "the version watch did not subscribe"
        await asyncio.sleep(0.01)


def test_an_invalidation_wakes_the_readers_of_its_version_or_an_older_one_with_its_traceparent(
    subject: Subject, fresh_ids: Callable[[int], list[int]]
) -> None:
    [todo_id] = fresh_ids(1)

    async def scenario() -> None:
        await watching(subject.watch)
        newer = subject.watch.wait_for(todo_id, 3)
        forgotten = subject.watch.wait_for(todo_id, 1)
        subject.watch.forget(todo_id, forgotten)
        older, same = subject.watch.wait_for(todo_id, 1), subject.watch.wait_for(todo_id, 2)

        await subject.cache.invalidate(todo_id, 2, TRACEPARENT)

        # One notice resolves every waiter it satisfies: once these are, the newer one was passed over.
        assert await asyncio.wait_for(asyncio.gather(older, same), DEADLINE_S) == [TRACEPARENT] * 2
        assert not newer.done() and not forgotten.done()
        await subject.cache.invalidate(todo_id, 3)
        assert await asyncio.wait_for(newer, DEADLINE_S) == ""
        for future in (newer, older, same):
            subject.watch.forget(todo_id, future)

    subject.run(scenario())
