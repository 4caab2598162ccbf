"""update_todo through functions-framework's Flask app, with a fake in-memory write store and publisher."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.unit.fakes import T0, FakeWriteStore, PublishRecorder, a_todo, assert_error
from todo_cqrs.domain.todo import Status, Todo, parse_time

FUNCTION = "update_todo"
pytestmark = pytest.mark.usefixtures("store", "published")  # every test on the fakes


@pytest.fixture
def todo(store: FakeWriteStore) -> Todo:
    return store.seed(a_todo(7, title="buy milk", version=3))


def patch(client: FlaskClient, path: str, body: Any, **kwargs: Any) -> Any:
    return client.patch(path, data=json.dumps(body), content_type="application/json", **kwargs)


def assert_unchanged(store: FakeWriteStore, published: PublishRecorder, todo: Todo) -> None:
    assert store.todos == {todo.id: todo}
    assert store.outbox == [] and published.calls == 0


@pytest.mark.parametrize("path", ["/7", "/todo/7", "/todo/7/"])
def test_patch_answers_200_with_the_changed_todo_and_its_etag_on_both_paths(
    client: FlaskClient, todo: Todo, path: str
) -> None:
    response = patch(client, path, {"status": "FINISHED", "description": "2 l"})

    assert response.status_code == 200
    assert response.headers["ETag"] == '"4"'
    body = response.get_json()
    assert {k: body[k] for k in ("id", "title", "description", "status", "version", "created_at")} == {
        "id": 7,
        "title": "buy milk",
        "description": "2 l",
        "status": "FINISHED",
        "version": 4,
        "created_at": "2026-11-27T10:00:00.123Z",
    }
    assert parse_time(body["updated_at"]) > T0


def test_patch_saves_the_change_and_its_updated_event_then_publishes(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    answered = patch(client, "/7", {"title": "buy oat milk"}).get_json()

    assert store.todos[7].to_dict() == answered
    assert store.todos[7].title == "buy oat milk"
    [event] = store.outbox
    assert (event.type, event.todo_id, event.version, event.data) == ("todo.updated.v1", 7, 4, answered)
    assert published.calls == 1


def test_successive_patches_raise_the_version_one_by_one(
    client: FlaskClient, store: FakeWriteStore, todo: Todo
) -> None:
    versions = [
        patch(client, "/7", {"status": s}).get_json()["version"]
        for s in ("IN_PROGRESS", "FINISHED", "CANCELED")
    ]

    assert versions == [4, 5, 6]
    assert [e.version for e in store.outbox] == [4, 5, 6]


def test_patch_that_changes_nothing_answers_200_same_version_and_publishes_nothing(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    response = patch(client, "/7", {"title": "buy milk", "status": "CREATED"})

    assert response.status_code == 200
    assert response.headers["ETag"] == '"3"'
    assert response.get_json() == todo.to_dict()
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("if_match", ['"3"', "*", ' "3" ', '"1", *'])
def test_matching_if_match_lets_the_change_through(client: FlaskClient, todo: Todo, if_match: str) -> None:
    response = patch(client, "/7", {"status": "FINISHED"}, headers={"If-Match": if_match})

    assert response.status_code == 200
    assert response.get_json()["version"] == 4


@pytest.mark.parametrize("if_match", ['"2"', '"4"', '"abc"', '""', '"1", "2"'])
def test_if_match_mismatch_answers_412_and_changes_nothing(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, if_match: str
) -> None:
    response = patch(client, "/7", {"status": "FINISHED"}, headers={"If-Match": if_match})

    assert_error(response, 412, "version_mismatch")
    assert_unchanged(store, published, todo)


def test_unknown_todo_answers_404(client: FlaskClient, store: FakeWriteStore, todo: Todo) -> None:
    assert_error(patch(client, "/8", {"status": "FINISHED"}), 404, "not_found")
    assert store.outbox == []


def test_id_beyond_the_id_column_answers_404(client: FlaskClient) -> None:
    assert_error(patch(client, f"/{2**63}", {"status": "FINISHED"}), 404, "not_found")


@pytest.mark.parametrize("path", ["/foo/bar", "/todo/7/x", "/", "/todo"])
def test_unknown_path_answers_404(client: FlaskClient, todo: Todo, path: str) -> None:
    assert_error(patch(client, path, {"status": "FINISHED"}), 404, "not_found")


@pytest.mark.parametrize("segment", ["abc", "0", "-1", "1.5", "00", "+1", "%C2%B3", "1e3"])
@pytest.mark.parametrize("prefix", ["", "/todo"])
def test_id_that_is_not_a_positive_integer_answers_400(
    client: FlaskClient, prefix: str, segment: str
) -> None:
    assert_error(patch(client, f"{prefix}/{segment}", {"status": "FINISHED"}), 400, "bad_request")


@pytest.mark.parametrize("method", ["PUT", "GET", "POST", "DELETE"])
def test_other_methods_on_a_todo_answer_405_with_allow(
    client: FlaskClient, store: FakeWriteStore, todo: Todo, method: str
) -> None:
    response = client.open("/todo/7", method=method, json={"status": "FINISHED"})

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "PATCH"
    assert store.todos == {7: todo}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),
        ({"title": ""}, "title"),
        ({"title": " "}, "title"),
        ({"title": "t" * 256}, "title"),
        ({"title": 1}, "title"),
        ({"description": "d" * 2001}, "description"),
        ({"description": None}, "description"),
        ({"status": "DONE"}, "status"),
        ({"status": "finished"}, "status"),
        ({"version": 9}, "version"),
        ({"status": "FINISHED", "colour": "red"}, "colour"),
    ],
)
def test_patch_breaking_a_rule_answers_422_naming_the_field_and_changes_nothing(
    client: FlaskClient,
    store: FakeWriteStore,
    published: PublishRecorder,
    todo: Todo,
    body: dict[str, Any],
    field: str,
) -> None:
    error = assert_error(patch(client, "/7", body), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == [field]
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("raw", [b"{", b"", b"nope"])
def test_body_that_is_not_valid_json_answers_400(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, raw: bytes
) -> None:
    assert_error(client.patch("/7", data=raw, content_type="application/json"), 400, "bad_request")
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("body", [[{"status": "FINISHED"}], "FINISHED", 3, None])
def test_json_that_is_not_an_object_answers_400(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, body: Any
) -> None:
    assert_error(patch(client, "/7", body), 400, "bad_request")
    assert_unchanged(store, published, todo)


def test_text_plain_body_answers_415(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    response = client.patch("/7", data=b'{"status": "FINISHED"}', content_type="text/plain")

    assert_error(response, 415, "unsupported_media_type")
    assert_unchanged(store, published, todo)


def test_body_larger_than_64_kib_answers_413(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    body = json.dumps({"description": "d" * (64 * 1024)})

    assert_error(client.patch("/7", data=body, content_type="application/json"), 413, "payload_too_large")
    assert_unchanged(store, published, todo)


def test_write_store_unreachable_answers_503_with_retry_after(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    store.unreachable = True

    response = patch(client, "/7", {"status": "FINISHED"})

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert_unchanged(store, published, todo)


def test_patch_after_the_todo_was_deleted_answers_404(
    client: FlaskClient, store: FakeWriteStore, todo: Todo
) -> None:
    del store.todos[7]

    assert_error(patch(client, "/7", {"status": "FINISHED"}), 404, "not_found")


def test_status_change_is_kept_as_the_enum(client: FlaskClient, store: FakeWriteStore, todo: Todo) -> None:
    patch(client, "/7", {"status": "IN_PROGRESS"})

    assert store.todos[7].status is Status.IN_PROGRESS
