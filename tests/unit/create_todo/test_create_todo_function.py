"""create_todo through functions-framework's Flask app, with a fake in-memory write store and publisher."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.unit.fakes import FakeWriteStore, PublishRecorder, assert_error
from todo_cqrs.domain.todo import Status, format_time, parse_time

FUNCTION = "create_todo"
pytestmark = pytest.mark.usefixtures("store", "published")  # every test on the fakes


def post(client: FlaskClient, body: Any, path: str = "/", **kwargs: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json", **kwargs)


def assert_nothing_written(store: FakeWriteStore, published: PublishRecorder) -> None:
    assert store.todos == {} and store.outbox == [] and published.calls == 0


@pytest.mark.parametrize("path", ["/", "/todo", "/todo/"])
def test_create_answers_201_with_location_etag_and_the_todo_on_both_paths(
    client: FlaskClient, store: FakeWriteStore, path: str
) -> None:
    store.next_id = 41

    response = post(client, {"title": "buy milk", "description": "2 l"}, path)

    assert response.status_code == 201
    assert response.headers["Location"] == "/todo/41"
    assert response.headers["ETag"] == '"1"'
    todo = response.get_json()
    assert {k: todo[k] for k in ("id", "title", "description", "status", "version")} == {
        "id": 41,
        "title": "buy milk",
        "description": "2 l",
        "status": "CREATED",
        "version": 1,
    }
    assert todo["created_at"] == todo["updated_at"]
    assert format_time(parse_time(todo["created_at"])) == todo["created_at"]


def test_create_stores_the_todo_and_its_created_event_in_one_transaction_then_publishes(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    response = post(client, {"title": "buy milk"})

    answered = response.get_json()
    [stored] = store.todos.values()
    assert stored.to_dict() == answered
    assert stored.description == "" and stored.status is Status.CREATED
    [event] = store.outbox
    assert (event.type, event.todo_id, event.version) == ("todo.created.v1", answered["id"], 1)
    assert event.data == answered
    assert published.calls == 1


def test_each_create_gets_the_next_id(client: FlaskClient, store: FakeWriteStore) -> None:
    first = post(client, {"title": "a"}).get_json()
    second = post(client, {"title": "b"}).get_json()

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
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, body: dict[str, Any], field: str
) -> None:
    error = assert_error(post(client, body), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == [field]
    assert_nothing_written(store, published)


@pytest.mark.parametrize("raw", [b"{", b"not json", b"{'title': 'a'}", b"", b"\xff\xfe"])
def test_body_that_is_not_valid_json_answers_400(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, raw: bytes
) -> None:
    assert_error(client.post("/", data=raw, content_type="application/json"), 400, "bad_request")
    assert_nothing_written(store, published)


@pytest.mark.parametrize("body", [["title"], "buy milk", 5, None, True])
def test_json_that_is_not_an_object_answers_400(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, body: Any
) -> None:
    assert_error(post(client, body), 400, "bad_request")
    assert_nothing_written(store, published)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_application_json_answers_415(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, content_type: str | None
) -> None:
    response = client.post("/", data=b'{"title": "a"}', content_type=content_type)

    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_written(store, published)


def test_application_json_with_a_charset_is_accepted(client: FlaskClient) -> None:
    response = client.post("/", data=b'{"title": "a"}', content_type="application/json; charset=utf-8")

    assert response.status_code == 201


def test_body_larger_than_64_kib_answers_413(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    body = json.dumps({"title": "a", "description": "d" * (64 * 1024)})

    assert_error(client.post("/", data=body, content_type="application/json"), 413, "payload_too_large")
    assert_nothing_written(store, published)


def test_body_of_exactly_64_kib_is_read(client: FlaskClient) -> None:
    compact = '{"title":"a"}'
    raw = compact[:-1] + " " * (64 * 1024 - len(compact)) + "}"

    assert client.post("/", data=raw, content_type="application/json").status_code == 201


def test_body_one_byte_over_64_kib_answers_413(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    compact = '{"title":"a"}'
    raw = compact[:-1] + " " * (64 * 1024 + 1 - len(compact)) + "}"

    assert_error(client.post("/", data=raw, content_type="application/json"), 413, "payload_too_large")
    assert_nothing_written(store, published)


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_other_methods_on_the_collection_answer_405_with_allow(client: FlaskClient, method: str) -> None:
    response = client.open("/todo", method=method)

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("path", ["/foo/bar", "/todo/1/x", "/1", "/todo/1"])
def test_unknown_path_answers_404(client: FlaskClient, store: FakeWriteStore, path: str) -> None:
    assert_error(post(client, {"title": "a"}, path), 404, "not_found")
    assert store.todos == {}


def test_write_store_unreachable_answers_503_with_retry_after(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder
) -> None:
    store.unreachable = True

    response = post(client, {"title": "a"})

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert published.calls == 0
