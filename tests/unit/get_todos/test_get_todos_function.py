"""get_todos built with fakes of the cache, the read store and the watch of the projection's version
notices passed in (tests/unit/fakes_read.py), served as functions-framework routes it."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from starlette.testclient import TestClient

from tests.unit.fakes import UPDATED, a_todo, assert_error, log_lines, todo_data
from tests.unit.fakes_read import (
    FakeCache,
    FakeReadStore,
    FakeVersionWatch,
    UnreachableCache,
    fake_projection,
)
from todo_cqrs.adapters.cache import CachedTodo
from todo_cqrs.domain.todo import Status, Todo
from todo_cqrs.projection.handlers import project_event
from todo_cqrs.query.handlers import Queries

FUNCTION = "get_todos"
DEPS = "queries"


@pytest.fixture
def redis_down(queries: Queries) -> UnreachableCache:
    queries.cache = UnreachableCache()
    return queries.cache


@pytest.fixture
def todo(read_model: FakeReadStore) -> Todo:
    return read_model.put(a_todo(7, title="buy milk", version=3))


@pytest.fixture
def wait_bound(queries: Queries) -> Callable[[float], None]:
    """Set the bound of a ?min_version wait (MIN_VERSION_WAIT_SECONDS) for one test."""

    def set_bound(seconds: float) -> None:
        queries.min_version_wait_s = seconds

    return set_bound


def body_of(response: Any) -> Any:
    return json.loads(response.content)


# --- one todo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/7", "/todo/7", "/todo/7/"])
def test_todo_from_the_read_db_answers_200_etag_and_x_cache_miss_on_both_paths(
    client: TestClient, cache: FakeCache, todo: Todo, path: str
) -> None:
    response = client.get(path)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert body_of(response) == todo.to_dict()
    assert response.headers["ETag"] == '"3"'
    assert response.headers["X-Cache"] == "miss"
    assert cache.stored_todos == [(7, 3)]


def test_second_read_is_a_cache_hit_with_the_same_body(client: TestClient, todo: Todo) -> None:
    first = client.get("/7")
    second = client.get("/7")

    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
    assert second.content == first.content
    assert second.headers["ETag"] == '"3"'


def test_cache_hit_answers_from_the_cache_without_reading_the_db(
    client: TestClient, cache: FakeCache, read_model: FakeReadStore, todo: Todo
) -> None:
    cached = a_todo(7, title="cached copy", version=3)
    cache.todos[7] = CachedTodo(3, json.dumps(cached.to_dict()).encode())

    response = client.get("/7")

    assert response.headers["X-Cache"] == "hit"
    assert body_of(response)["title"] == "cached copy"
    assert read_model.reads == 0


def test_unreachable_redis_is_bypassed_and_nothing_is_stored(
    client: TestClient, redis_down: UnreachableCache, todo: Todo
) -> None:
    response = client.get("/7")

    assert response.status_code == 200
    assert response.headers["X-Cache"] == "bypass"
    assert response.headers["ETag"] == '"3"'
    assert body_of(response) == todo.to_dict()
    assert redis_down.stored_todos == []


@pytest.mark.parametrize("redis_is_down", [False, True])
def test_unreachable_read_db_answers_503_with_retry_after(
    client: TestClient, queries: Queries, read_model: FakeReadStore, redis_is_down: bool
) -> None:
    if redis_is_down:
        queries.cache = UnreachableCache()
    read_model.unreachable = True

    response = client.get("/7")

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize("redis_is_down", [False, True])
def test_unknown_todo_answers_404_with_x_cache(
    client: TestClient, queries: Queries, cache: FakeCache, todo: Todo, redis_is_down: bool
) -> None:
    if redis_is_down:
        queries.cache = UnreachableCache()

    response = client.get("/8")

    assert_error(response, 404, "not_found")
    assert response.headers["X-Cache"] == ("bypass" if redis_is_down else "miss")
    assert cache.stored_todos == []


def test_deleted_todo_answers_404(client: TestClient, read_model: FakeReadStore) -> None:
    read_model.tombstone(7, 4)

    response = client.get("/todo/7")

    assert_error(response, 404, "not_found")
    assert response.headers["X-Cache"] == "miss"


@pytest.mark.parametrize("path", ["/07", "/todo/0007", "/" + "0" * 30 + "7"])
def test_an_id_with_leading_zeros_is_that_id_however_many(client: TestClient, todo: Todo, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 200 and response.json()["id"] == 7


def test_the_largest_id_of_the_id_column_is_an_id_no_todo_has_404(client: TestClient) -> None:
    todo_id = 2**63 - 1
    assert_error(client.get(f"/{todo_id}"), 404, "not_found")


@pytest.mark.parametrize("todo_id", [2**63, 10**19 - 1, 10**20])
def test_id_beyond_the_id_column_answers_400(client: TestClient, todo_id: int) -> None:
    assert_error(client.get(f"/{todo_id}"), 400, "bad_request")


@pytest.mark.parametrize("if_none_match", ['"3"', '"1", "3"', "*", 'W/"3"'])
def test_if_none_match_with_the_current_etag_answers_304(
    client: TestClient, todo: Todo, if_none_match: str
) -> None:
    response = client.get("/7", headers={"If-None-Match": if_none_match})

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["ETag"] == '"3"'


def test_if_none_match_on_a_cache_hit_answers_304(client: TestClient, todo: Todo) -> None:
    client.get("/7")

    response = client.get("/7", headers={"If-None-Match": '"3"'})

    assert response.status_code == 304
    assert response.headers["X-Cache"] == "hit"


@pytest.mark.parametrize("if_none_match", ['"2"', '"4"', '"x"', '"٣"', '"³"'])
def test_if_none_match_with_another_etag_answers_200(
    client: TestClient, todo: Todo, if_none_match: str
) -> None:
    response = client.get("/7", headers={"If-None-Match": if_none_match.encode()})

    assert response.status_code == 200
    assert body_of(response) == todo.to_dict()


def test_head_answers_the_headers_without_a_body(client: TestClient, todo: Todo) -> None:
    response = client.head("/7")

    assert response.status_code == 200
    assert response.headers["ETag"] == '"3"'
    assert response.content == b""


@pytest.mark.parametrize(
    "segment", ["abc", "0", "-1", "1.5", "7x", "%D9%A7", "%EF%BC%97", "%C2%B2", "1" * 5000, "%25", "%FF"]
)
@pytest.mark.parametrize("prefix", ["", "/todo"])
def test_id_that_is_not_a_positive_integer_in_ascii_digits_answers_400(
    client: TestClient, read_model: FakeReadStore, prefix: str, segment: str
) -> None:
    assert_error(client.get(f"{prefix}/{segment}"), 400, "bad_request")
    assert read_model.reads == 0


@pytest.mark.parametrize("path", ["/foo/bar", "/todo/7/x", "/todo/todo/7"])
def test_unknown_path_answers_404(client: TestClient, todo: Todo, path: str) -> None:
    assert_error(client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/"),
        ("POST", "/todo"),
        ("PUT", "/todo/7"),
        ("DELETE", "/7"),
        ("PATCH", "/7"),
        ("OPTIONS", "/7"),
    ],
)
def test_other_methods_answer_405_with_allow(client: TestClient, todo: Todo, method: str, path: str) -> None:
    response = client.request(method, path, json={"title": "x"})

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD"


# --- min_version (read-your-writes) -------------------------------------------------------------


def test_min_version_already_cached_answers_the_hit(
    client: TestClient, read_model: FakeReadStore, todo: Todo
) -> None:
    client.get("/7")

    response = client.get("/7?min_version=3")

    assert response.headers["X-Cache"] == "hit"
    assert read_model.reads == 1


def test_min_version_newer_than_the_cache_reads_the_db(
    client: TestClient, cache: FakeCache, read_model: FakeReadStore, watch: FakeVersionWatch
) -> None:
    cache.todos[7] = CachedTodo(3, json.dumps(a_todo(7, version=3).to_dict()).encode())
    read_model.put(a_todo(7, title="newer", version=4))

    response = client.get("/7?min_version=4")

    assert response.status_code == 200
    assert response.headers["ETag"] == '"4"'
    assert response.headers["X-Cache"] == "miss"
    assert body_of(response)["title"] == "newer"
    assert watch.waiting == {}


def test_min_version_is_woken_by_the_projections_notice(
    client: TestClient,
    read_model: FakeReadStore,
    cache: FakeCache,
    watch: FakeVersionWatch,
    todo: Todo,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The reader waits on the watch, not on a poll: the real projection handler, on the fakes, applies
    version 4 while it waits, and its invalidation's notice wakes the reader (which logs whose notice
    woke it; a reader that only saw the row at the end of its bound would not)."""
    projection = fake_projection(read_model, cache)
    watch.land_when_waited(7, lambda: project_event(projection, UPDATED, todo_data(7, 4, title="landed")))

    response = client.get("/todo/7?min_version=4")

    assert response.status_code == 200
    assert body_of(response)["title"] == "landed" and response.headers["ETag"] == '"4"'
    [(todo_id, version, traceparent)] = cache.invalidations
    assert (todo_id, version) == (7, 4) and traceparent
    [line] = [line for line in log_lines(capfd) if line.get("path") == "/todo/7"]
    assert line["woken_by_trace"] == traceparent
    assert read_model.row_lookups == [7, 7]  # before the wait, and once woken
    assert watch.waits == [(7, 4), (7, 4)]
    assert watch.waiting == {}  # every registered waiter was forgotten again


def test_min_version_polls_the_read_model_while_the_watch_is_down(
    client: TestClient,
    read_model: FakeReadStore,
    watch: FakeVersionWatch,
    todo: Todo,
    wait_bound: Callable[[float], None],
) -> None:
    watch.healthy = False
    wait_bound(30)
    read_model.arrive_after(2, lambda: read_model.put(a_todo(7, title="landed", version=4)))

    response = client.get("/todo/7?min_version=4")

    assert response.status_code == 200
    assert body_of(response)["version"] == 4
    assert read_model.reads == 3
    assert watch.waits == []


def test_min_version_reached_by_the_deletion_answers_404(
    client: TestClient, read_model: FakeReadStore, wait_bound: Callable[[float], None]
) -> None:
    wait_bound(0)
    read_model.tombstone(7, 4)

    assert_error(client.get("/7?min_version=4"), 404, "not_found")


@pytest.mark.parametrize("watch_healthy", [True, False])
@pytest.mark.parametrize("seed", ["older version", "never seen"])
def test_min_version_not_reached_in_time_answers_503_not_yet_consistent(
    client: TestClient,
    read_model: FakeReadStore,
    watch: FakeVersionWatch,
    wait_bound: Callable[[float], None],
    seed: str,
    watch_healthy: bool,
) -> None:
    watch.healthy = watch_healthy
    wait_bound(0.05)
    if seed == "older version":
        read_model.put(a_todo(7, version=3))

    response = client.get("/7?min_version=4")

    assert_error(response, 503, "not_yet_consistent")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["X-Cache"] == "miss"
    assert watch.waiting == {}


@pytest.mark.parametrize(
    "value", ["0", "x", "-1", "", "1.5", "١٠", "²", "１", "4 ", "+4", "0x4", "4_0", "9" * 5000, str(2**31)]
)
def test_min_version_that_is_not_a_positive_integer_in_ascii_digits_answers_422(
    client: TestClient, read_model: FakeReadStore, todo: Todo, value: str
) -> None:
    error = assert_error(client.get("/7", params={"min_version": value}), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == ["min_version"]
    assert read_model.reads == 0


def test_min_version_at_the_version_columns_limit_is_accepted(
    client: TestClient, read_model: FakeReadStore, wait_bound: Callable[[float], None]
) -> None:
    wait_bound(0)
    read_model.put(a_todo(7, version=2**31 - 1))

    assert client.get("/7", params={"min_version": str(2**31 - 1)}).status_code == 200


# --- the list -----------------------------------------------------------------------------------


@pytest.fixture
def five(read_model: FakeReadStore) -> list[Todo]:
    statuses = [Status.CREATED, Status.FINISHED, Status.CREATED, Status.FINISHED, Status.FINISHED]
    return [read_model.put(a_todo(i, status=s)) for i, s in zip([2, 4, 5, 9, 11], statuses, strict=True)]


def ids(response: Any) -> list[int]:
    return [item["id"] for item in body_of(response)["items"]]


@pytest.mark.parametrize("path", ["/", "/todo", "/todo/"])
def test_list_answers_items_in_ascending_id_and_no_cursor_when_all_fit(
    client: TestClient, read_model: FakeReadStore, five: list[Todo], path: str
) -> None:
    response = client.get(path)

    assert response.status_code == 200
    assert body_of(response) == {"items": [t.to_dict() for t in five], "next_cursor": None}
    assert response.headers["X-Cache"] == "miss"
    assert read_model.list_queries == [(None, 0, 21)]  # default limit 20, one more to know of a next page


def test_list_pages_by_key_until_the_cursor_is_null(
    client: TestClient, read_model: FakeReadStore, five: list[Todo]
) -> None:
    pages, cursor = [], None
    for _ in range(5):
        params = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        body = body_of(client.get("/todo", params=params))
        pages.append([item["id"] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert pages == [[2, 4], [5, 9], [11]]
    assert [after_id for _, after_id, _ in read_model.list_queries] == [0, 4, 9]


def test_list_with_exactly_a_page_of_todos_has_no_next_cursor(client: TestClient, five: list[Todo]) -> None:
    assert body_of(client.get("/?limit=5"))["next_cursor"] is None
    assert body_of(client.get("/?limit=4"))["next_cursor"] is not None


def test_list_filters_by_status_across_pages(
    client: TestClient, read_model: FakeReadStore, five: list[Todo]
) -> None:
    first = client.get("/?status=FINISHED&limit=2")
    second = client.get(
        "/", params={"status": "FINISHED", "limit": 2, "cursor": body_of(first)["next_cursor"]}
    )

    assert (ids(first), ids(second)) == ([4, 9], [11])
    assert body_of(second)["next_cursor"] is None
    assert {status for status, _, _ in read_model.list_queries} == {Status.FINISHED}


def test_list_of_an_empty_read_model_is_empty(client: TestClient) -> None:
    assert body_of(client.get("/")) == {"items": [], "next_cursor": None}


def test_same_page_again_is_a_cache_hit(
    client: TestClient, read_model: FakeReadStore, five: list[Todo]
) -> None:
    first = client.get("/?limit=2&status=FINISHED")
    second = client.get("/?limit=2&status=FINISHED")

    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
    assert second.content == first.content
    assert len(read_model.list_queries) == 1


def test_another_page_or_filter_is_not_served_from_the_cache(client: TestClient, five: list[Todo]) -> None:
    client.get("/?limit=2")

    assert client.get("/?limit=3").headers["X-Cache"] == "miss"
    assert client.get("/?limit=2&status=CREATED").headers["X-Cache"] == "miss"


def test_list_bypasses_unreachable_redis(
    client: TestClient, redis_down: UnreachableCache, five: list[Todo]
) -> None:
    response = client.get("/?limit=2")

    assert response.status_code == 200
    assert response.headers["X-Cache"] == "bypass"
    assert ids(response) == [2, 4]
    assert redis_down.stored_pages == []


@pytest.mark.parametrize("failure", ["unreachable", "operational_error"])
def test_list_with_the_read_db_unreachable_answers_503(
    client: TestClient, read_model: FakeReadStore, failure: str
) -> None:
    if failure == "unreachable":
        read_model.unreachable = True
    else:  # as the real ReadStore turns a lost server into DependencyUnavailable, not a 500
        from todo_cqrs import db

        read_model.fail_with = db.unavailable("read", OperationalError("SELECT", {}, ConnectionError("gone")))

    response = client.get("/todo")

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize("limit", ["1", "100"])
def test_limit_bounds_are_accepted(client: TestClient, read_model: FakeReadStore, limit: str) -> None:
    assert client.get(f"/?limit={limit}").status_code == 200
    assert read_model.list_queries[-1][2] == int(limit) + 1


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limit": "١٠"}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"limit": "１"}, "limit"),
        ({"limit": "1" * 5000}, "limit"),
        ({"cursor": "garbage!"}, "cursor"),
        ({"cursor": "\xff\xfe"}, "cursor"),
        ({"cursor": cursor_of("before:3")}, "cursor"),
        ({"cursor": cursor_of("after:x")}, "cursor"),
        ({"cursor": cursor_of("after:١٠")}, "cursor"),
        ({"cursor": cursor_of("after:0")}, "cursor"),
        ({"cursor": cursor_of("after:" + "9" * 5000)}, "cursor"),
        ({"cursor": "%" * 30}, "cursor"),
        ({"status": "bogus"}, "status"),
        ({"status": "finished"}, "status"),
        ({"status": ""}, "status"),
    ],
)
def test_bad_list_parameter_answers_422_naming_it(
    client: TestClient, read_model: FakeReadStore, query: dict[str, str], field: str
) -> None:
    error = assert_error(client.get("/todo", params=query), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == [field]
    assert read_model.list_queries == []


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_path_answers_200_without_the_stores(
    client: TestClient, read_model: FakeReadStore, redis_down: UnreachableCache, path: str
) -> None:
    read_model.unreachable = True

    response = client.get(path)

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
