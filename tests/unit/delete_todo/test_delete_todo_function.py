"""delete_todo through functions-framework's ASGI app, with a fake in-memory write store and publisher."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import T0, FakeWriteStore, PublishRecorder, a_todo, assert_error
from todo_cqrs.domain.clock import format_time, parse_time
from todo_cqrs.domain.todo import Status, Todo

FUNCTION = "delete_todo"
DEPS = "commands"  # every test on the fakes, passed in


@pytest.fixture
def todo(store: FakeWriteStore) -> Todo:
    store.seed(a_todo(3))
    return store.seed(a_todo(7, title="buy milk", status=Status.IN_PROGRESS, version=5))


def delete(client: TestClient, path: str = "/7", **headers: str | bytes) -> Any:
    return client.delete(path, headers=headers)


def assert_unchanged(store: FakeWriteStore, published: PublishRecorder, todo: Todo) -> None:
    assert store.todos[todo.id] == todo and len(store.todos) == 2
    assert store.outbox == [] and store.keys == {} and published.calls == 0


@pytest.mark.parametrize("path", ["/7", "/todo/7", "/todo/7/"])
def test_delete_answers_200_with_the_todo_as_it_was_on_both_paths(
    client: TestClient, todo: Todo, path: str
) -> None:
    response = client.delete(path)

    assert response.status_code == 200
    assert response.json() == todo.to_dict()
    assert response.headers["ETag"] == '"5"'


def test_delete_removes_only_that_todo_and_records_its_deleted_event_then_publishes(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    client.delete("/7")

    assert list(store.todos) == [3]
    [row] = store.outbox
    event = row.event
    assert (event.type, event.todo_id, event.version) == ("todo.deleted.v1", 7, 6)
    assert event.data["id"] == 7 and event.data["version"] == 6
    assert parse_time(event.data["deleted_at"]) == event.time == store.now
    assert published.committed_rows == [(row.outbox_id, None)]


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", b"garbage", 415),
        ("", b"garbage", 415),
        ("application/json", b"x" * 70_000, 413),
        ("application/json", b"not json", 400),
    ],
)
def test_body_that_no_post_or_patch_could_send_answers_4xx_and_deletes_nothing(
    client: TestClient,
    store: FakeWriteStore,
    published: PublishRecorder,
    todo: Todo,
    content_type: str,
    body: bytes,
    status: int,
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.request("DELETE", "/7", content=body, headers=headers)

    assert response.status_code == status
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize(("content_type", "body"), [("application/json", b"{}"), ("text/plain", b"")])
def test_json_or_empty_body_is_no_reason_to_refuse_a_delete(
    client: TestClient, store: FakeWriteStore, todo: Todo, content_type: str, body: bytes
) -> None:
    response = client.request("DELETE", "/7", content=body, headers={"Content-Type": content_type})

    assert response.status_code == 200
    assert list(store.todos) == [3]


def test_deletion_time_is_never_before_the_last_update_when_the_database_clock_goes_back(
    client: TestClient, store: FakeWriteStore, todo: Todo
) -> None:
    store.now = T0 - timedelta(hours=1)

    client.delete("/7")

    [event] = store.events
    assert event.data["deleted_at"] == format_time(T0) and event.time == T0


def test_deleted_todo_is_gone_for_the_next_delete(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    assert client.delete("/7").status_code == 200

    assert_error(client.delete("/7"), 404, "not_found")
    assert len(store.outbox) == 1 and published.calls == 1


@pytest.mark.parametrize("if_match", ['"5"', "*"])
def test_matching_if_match_deletes(
    client: TestClient, store: FakeWriteStore, todo: Todo, if_match: str
) -> None:
    response = delete(client, **{"If-Match": if_match})

    assert response.status_code == 200
    assert 7 not in store.todos


@pytest.mark.parametrize("if_match", ['"4"', '"6"', '"x"', '"4", "6"', '"٥"', '"⁵"'])
def test_if_match_mismatch_answers_412_and_deletes_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, if_match: str
) -> None:
    response = delete(client, **{"If-Match": if_match.encode()})

    assert_error(response, 412, "version_mismatch")
    assert_unchanged(store, published, todo)


def test_unknown_todo_answers_404_and_deletes_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    assert_error(client.delete("/8"), 404, "not_found")
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("path", ["/foo/bar", "/todo/7/x", "/", "/todo"])
def test_unknown_path_answers_404(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, path: str
) -> None:
    assert_error(client.delete(path), 404, "not_found")
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("segment", ["abc", "0", "-1", "1.5", "7a", " 7", "%D9%A7", "%EF%BC%97", "%E2%81%B7"])
@pytest.mark.parametrize("prefix", ["", "/todo"])
def test_id_that_is_not_a_positive_integer_in_ascii_digits_answers_400(
    client: TestClient,
    store: FakeWriteStore,
    published: PublishRecorder,
    todo: Todo,
    prefix: str,
    segment: str,
) -> None:
    assert_error(client.delete(f"{prefix}/{segment}"), 400, "bad_request")
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "POST"])
def test_other_methods_on_a_todo_answer_405_with_allow(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, method: str
) -> None:
    response = client.request(method, "/todo/7")

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "DELETE"
    assert_unchanged(store, published, todo)


def test_write_store_unreachable_answers_503_with_retry_after(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    store.unreachable = True

    response = client.delete("/7")

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert_unchanged(store, published, todo)


def test_failure_after_the_delete_rolls_it_back(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    store.fail_in = "append_events"

    assert_error(client.delete("/7"), 503, "dependency_unavailable")

    assert_unchanged(store, published, todo)


# --- Idempotency-Key ----------------------------------------------------------------------------


def test_repeat_with_the_same_key_answers_exactly_the_first_answer_not_404(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    first = delete(client, **{"Idempotency-Key": "k"})

    repeat = delete(client, **{"Idempotency-Key": "k"})

    assert (first.status_code, repeat.status_code) == (200, 200)
    assert repeat.content == first.content and repeat.headers["ETag"] == first.headers["ETag"]
    assert len(store.outbox) == 1 and published.calls == 1


@pytest.mark.parametrize(
    ("path", "headers"), [("/3", {}), ("/7", {"If-Match": '"5"'})], ids=["other-todo", "other-if-match"]
)
def test_same_key_with_another_request_answers_422(
    client: TestClient, store: FakeWriteStore, todo: Todo, path: str, headers: dict[str, str]
) -> None:
    delete(client, **{"Idempotency-Key": "k"})

    assert_error(delete(client, path, **{"Idempotency-Key": "k", **headers}), 422, "idempotency_key_reused")
    assert 3 in store.todos


def test_key_in_flight_answers_409_with_retry_after(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    store.hold_key("k")

    response = delete(client, **{"Idempotency-Key": "k"})

    assert_error(response, 409, "idempotency_key_in_flight")
    assert int(response.headers["Retry-After"]) >= 1
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_empty_or_too_long_key_answers_400(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, key: str
) -> None:
    assert_error(delete(client, **{"Idempotency-Key": key}), 400, "bad_request")
    assert_unchanged(store, published, todo)
