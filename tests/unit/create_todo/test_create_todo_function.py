"""create_todo through functions-framework's ASGI app, with a fake in-memory write store and publisher."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import FakeWriteStore, PublishRecorder, assert_error
from todo_cqrs.command.unit_of_work import Outcome
from todo_cqrs.domain.clock import format_time, parse_time
from todo_cqrs.domain.todo import Status

FUNCTION = "create_todo"
DEPS = "commands"  # every test on the fakes, passed in


def post(client: TestClient, body: Any, path: str = "/", **headers: str) -> Any:
    return client.post(
        path, content=json.dumps(body), headers={"Content-Type": "application/json", **headers}
    )


def post_raw(client: TestClient, raw: bytes, content_type: str | None = "application/json") -> Any:
    return client.post("/", content=raw, headers={"Content-Type": content_type} if content_type else {})


def assert_nothing_written(store: FakeWriteStore, published: PublishRecorder) -> None:
    assert store.todos == {} and store.outbox == [] and store.keys == {} and published.calls == 0


@pytest.mark.parametrize("path", ["/", "/todo", "/todo/"])
def test_create_answers_201_with_location_etag_and_the_todo_on_both_paths(
    client: TestClient, store: FakeWriteStore, path: str
) -> None:
    store.next_id = 41

    response = post(client, {"title": "buy milk", "description": "2 l"}, path)

    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    assert response.headers["Location"] == "/todo/41"
    assert response.headers["ETag"] == '"1"'
    todo = response.json()
    assert {k: todo[k] for k in ("id", "title", "description", "status", "version")} == {
        "id": 41,
        "title": "buy milk",
        "description": "2 l",
        "status": "CREATED",
        "version": 1,
    }
    assert todo["created_at"] == todo["updated_at"]
    assert format_time(parse_time(todo["created_at"])) == todo["created_at"]


def test_created_at_is_the_write_databases_clock(client: TestClient, store: FakeWriteStore) -> None:
    todo = post(client, {"title": "buy milk"}).json()

    assert todo["created_at"] == todo["updated_at"] == format_time(store.now)


def test_create_stores_the_todo_and_its_created_event_in_one_transaction_then_publishes(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    response = post(client, {"title": "buy milk"})

    answered = response.json()
    [stored] = store.todos.values()
    assert stored.to_dict() == answered
    assert stored.description == "" and stored.status is Status.CREATED
    [row] = store.outbox
    event = row.event
    assert (event.type, event.todo_id, event.version) == ("todo.created.v1", answered["id"], 1)
    assert event.data == answered
    assert store.transactions == 1
    assert published.committed_rows == [(row.outbox_id, None)]


def test_each_create_gets_the_next_id(client: TestClient, store: FakeWriteStore) -> None:
    first = post(client, {"title": "a"}).json()
    second = post(client, {"title": "b"}).json()

    assert (first["id"], second["id"]) == (1, 2)
    assert len(store.outbox) == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "title"),
        ({"description": "x"}, "title"),
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "t" * 256}, "title"),
        ({"title": 42}, "title"),
        ({"title": None}, "title"),
        ({"title": "a", "description": "d" * 2001}, "description"),
        ({"title": "a", "description": False}, "description"),
        ({"title": "a", "priority": "high"}, "priority"),
        ({"title": "a", "status": "FINISHED"}, "status"),
    ],
)
def test_body_breaking_a_rule_answers_422_naming_the_field_and_writes_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, body: dict[str, Any], field: str
) -> None:
    error = assert_error(post(client, body), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == [field]
    assert_nothing_written(store, published)


@pytest.mark.parametrize(
    "raw", [b'{"title": "\\ud800"}', b'{"title": "a\\udfffb"}', b'{"title": "ok", "description": "\\ud83d"}']
)
def test_string_with_a_lone_surrogate_answers_422_naming_the_field(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, raw: bytes
) -> None:
    error = assert_error(post_raw(client, raw), 422, "validation_failed")

    [problem] = error["details"]
    assert problem["field"] in raw.decode() and "Unicode" in problem["message"]
    assert_nothing_written(store, published)


def test_a_real_surrogate_pair_is_one_character_and_is_accepted(client: TestClient) -> None:
    response = post_raw(client, b'{"title": "tea \\ud83c\\udf75"}')

    assert response.status_code == 201
    assert response.json()["title"] == "tea \U0001f375"


@pytest.mark.parametrize("raw", [b"{", b"not json", b"{'title': 'a'}", b"", b"\xff\xfe", b'{"title": NaN}'])
def test_body_that_is_not_valid_json_answers_400(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, raw: bytes
) -> None:
    assert_error(post_raw(client, raw), 400, "bad_request")
    assert_nothing_written(store, published)


@pytest.mark.parametrize("body", [["title"], "buy milk", 5, None, True])
def test_json_that_is_not_an_object_answers_400(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, body: Any
) -> None:
    assert_error(post(client, body), 400, "bad_request")
    assert_nothing_written(store, published)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_application_json_answers_415(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, content_type: str | None
) -> None:
    response = post_raw(client, b'{"title": "a"}', content_type)

    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_written(store, published)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_application_json_with_a_charset_or_in_capitals_is_accepted(
    client: TestClient, content_type: str
) -> None:
    assert post_raw(client, b'{"title": "a"}', content_type).status_code == 201


def test_body_larger_than_64_kib_answers_413(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    body = {"title": "a", "description": "d" * (64 * 1024)}

    assert_error(post(client, body), 413, "payload_too_large")
    assert_nothing_written(store, published)


def test_body_of_exactly_64_kib_is_read(client: TestClient) -> None:
    compact = '{"title":"a"}'
    raw = compact[:-1] + " " * (64 * 1024 - len(compact)) + "}"

    assert post_raw(client, raw.encode()).status_code == 201


def test_body_one_byte_over_64_kib_answers_413(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    compact = '{"title":"a"}'
    raw = compact[:-1] + " " * (64 * 1024 + 1 - len(compact)) + "}"

    assert_error(post_raw(client, raw.encode()), 413, "payload_too_large")
    assert_nothing_written(store, published)


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_other_methods_on_the_collection_answer_405_with_allow(client: TestClient, method: str) -> None:
    response = client.request(method, "/todo")

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("path", ["/foo/bar", "/todo/1/x", "/1", "/todo/1"])
def test_unknown_path_answers_404(client: TestClient, store: FakeWriteStore, path: str) -> None:
    assert_error(post(client, {"title": "a"}, path), 404, "not_found")
    assert store.todos == {}


def test_write_store_unreachable_answers_503_with_retry_after(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    store.unreachable = True

    response = post(client, {"title": "a"})

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert published.calls == 0


def test_failure_after_the_insert_rolls_back_the_todo_and_publishes_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    store.fail_in = "append_events"

    assert_error(post(client, {"title": "a"}), 503, "dependency_unavailable")

    assert_nothing_written(store, published)


# --- Idempotency-Key ----------------------------------------------------------------------------


def test_repeat_with_the_same_key_and_body_answers_exactly_the_first_answer_and_creates_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    first = post(client, {"title": "buy milk"}, **{"Idempotency-Key": "k-1"})
    store.now = store.now.replace(year=2027)  # a re-run would show another created_at

    repeat = post(client, {"title": "buy milk"}, **{"Idempotency-Key": "k-1"})

    assert first.status_code == repeat.status_code == 201
    assert repeat.content == first.content
    for header in ("Location", "ETag", "content-type"):
        assert repeat.headers[header] == first.headers[header]
    assert len(store.todos) == 1 and len(store.outbox) == 1 and published.calls == 1


def test_key_is_kept_with_the_change_in_one_transaction(client: TestClient, store: FakeWriteStore) -> None:
    post(client, {"title": "buy milk"}, **{"Idempotency-Key": "k-1"})

    [stored] = store.keys.values()
    assert stored.holder is None and stored.stored is not None and stored.stored.outcome is Outcome.CREATED
    assert store.transactions == 1


def test_same_key_with_another_body_answers_422_and_creates_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    post(client, {"title": "buy milk"}, **{"Idempotency-Key": "k-1"})

    response = post(client, {"title": "buy bread"}, **{"Idempotency-Key": "k-1"})

    error = assert_error(response, 422, "idempotency_key_reused")
    assert [problem["field"] for problem in error["details"]] == ["Idempotency-Key"]
    assert len(store.todos) == 1 and published.calls == 1


def test_same_key_on_the_other_path_of_the_same_function_is_the_same_request(
    client: TestClient, store: FakeWriteStore
) -> None:
    first = post(client, {"title": "buy milk"}, "/", **{"Idempotency-Key": "k-1"})

    repeat = post(client, {"title": "buy milk"}, "/todo", **{"Idempotency-Key": "k-1"})

    assert repeat.content == first.content and len(store.todos) == 1


def test_other_keys_create_other_todos(client: TestClient, store: FakeWriteStore) -> None:
    ids = {post(client, {"title": "a"}, **{"Idempotency-Key": key}).json()["id"] for key in ("a", "b", "A")}

    assert len(ids) == 3 and len(store.todos) == 3


def test_key_held_by_a_request_in_flight_answers_409_with_retry_after(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    store.hold_key("k-1")

    response = post(client, {"title": "buy milk"}, **{"Idempotency-Key": "k-1"})

    assert_error(response, 409, "idempotency_key_in_flight")
    assert int(response.headers["Retry-After"]) >= 1
    assert_nothing_written(store, published)


def test_concurrent_repeat_answers_409_while_the_first_runs_then_the_first_answer(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    """Two requests with one key on the function's event loop: the second arrives while the first
    still holds the key inside its transaction."""
    store.pause_inside_transactions()
    answers: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: answers.update(first=post(client, {"title": "a"}, **{"Idempotency-Key": "k"}))
    )
    first.start()
    try:
        assert store.gate_reached.wait(10), "the first request never reached its transaction"
        in_flight = post(client, {"title": "a"}, **{"Idempotency-Key": "k"})
    finally:
        assert client.portal is not None
        client.portal.call(store.resume)
        first.join(10)

    assert_error(in_flight, 409, "idempotency_key_in_flight")
    assert answers["first"].status_code == 201
    repeat = post(client, {"title": "a"}, **{"Idempotency-Key": "k"})
    assert repeat.content == answers["first"].content
    assert len(store.todos) == 1 and published.calls == 1


def test_failed_first_attempt_keeps_no_key_so_the_retry_runs(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    store.fail_in = "append_events"
    assert_error(post(client, {"title": "a"}, **{"Idempotency-Key": "k"}), 503, "dependency_unavailable")
    assert store.keys == {}
    store.fail_in = None

    retry = post(client, {"title": "a"}, **{"Idempotency-Key": "k"})

    assert retry.status_code == 201 and len(store.todos) == 1 and published.calls == 1


def test_rejected_body_keeps_no_key(client: TestClient, store: FakeWriteStore) -> None:
    assert_error(post(client, {"title": ""}, **{"Idempotency-Key": "k"}), 422, "validation_failed")

    assert post(client, {"title": "a"}, **{"Idempotency-Key": "k"}).status_code == 201


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_empty_or_too_long_key_answers_400(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, key: str
) -> None:
    assert_error(post(client, {"title": "a"}, **{"Idempotency-Key": key}), 400, "bad_request")
    assert_nothing_written(store, published)


def test_key_of_255_characters_is_accepted(client: TestClient) -> None:
    assert post(client, {"title": "a"}, **{"Idempotency-Key": "k" * 255}).status_code == 201


def test_without_a_key_each_repeat_creates_a_todo(client: TestClient, store: FakeWriteStore) -> None:
    post(client, {"title": "a"})
    post(client, {"title": "a"})

    assert len(store.todos) == 2 and store.keys == {}
