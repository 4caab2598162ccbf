"""update_todo through functions-framework's ASGI app, with a fake in-memory write store and publisher."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import T0, FakeWriteStore, PublishRecorder, a_todo, assert_error
from todo_cqrs.domain.clock import format_time, parse_time
from todo_cqrs.domain.todo import Status, Todo

FUNCTION = "update_todo"
DEPS = "commands"  # every test on the fakes, passed in


@pytest.fixture
def todo(store: FakeWriteStore) -> Todo:
    return store.seed(a_todo(7, title="buy milk", version=3))


def patch(client: TestClient, path: str, body: Any, **headers: str | bytes) -> Any:
    return client.patch(
        path, content=json.dumps(body), headers={"Content-Type": "application/json", **headers}
    )


def patch_raw(client: TestClient, raw: bytes, content_type: str = "application/json") -> Any:
    return client.patch("/7", content=raw, headers={"Content-Type": content_type})


def assert_unchanged(store: FakeWriteStore, published: PublishRecorder, todo: Todo) -> None:
    assert store.todos == {todo.id: todo}
    assert store.outbox == [] and store.keys == {} and published.calls == 0


@pytest.mark.parametrize("path", ["/7", "/todo/7", "/todo/7/"])
def test_patch_answers_200_with_the_changed_todo_and_its_etag_on_both_paths(
    client: TestClient, todo: Todo, path: str
) -> None:
    response = patch(client, path, {"status": "FINISHED", "description": "2 l"})

    assert response.status_code == 200
    assert response.headers["ETag"] == '"4"'
    body = response.json()
    assert {k: body[k] for k in ("id", "title", "description", "status", "version", "created_at")} == {
        "id": 7,
        "title": "buy milk",
        "description": "2 l",
        "status": "FINISHED",
        "version": 4,
        "created_at": "2026-11-27T10:00:00.123Z",
    }
    assert parse_time(body["updated_at"]) > T0


def test_updated_at_is_the_write_databases_clock(
    client: TestClient, store: FakeWriteStore, todo: Todo
) -> None:
    body = patch(client, "/7", {"status": "FINISHED"}).json()

    assert body["updated_at"] == format_time(store.now)


def test_updated_at_never_goes_back_when_the_database_clock_does(
    client: TestClient, store: FakeWriteStore, todo: Todo
) -> None:
    store.now = T0 - timedelta(hours=1)

    body = patch(client, "/7", {"status": "FINISHED"}).json()

    assert (body["version"], body["updated_at"]) == (4, format_time(T0))


def test_patch_saves_the_change_and_its_updated_event_then_publishes(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    answered = patch(client, "/7", {"title": "buy oat milk"}).json()

    assert store.todos[7].to_dict() == answered
    assert store.todos[7].title == "buy oat milk"
    [row] = store.outbox
    event = row.event
    assert (event.type, event.todo_id, event.version, event.data) == ("todo.updated.v1", 7, 4, answered)
    assert published.committed_rows == [(row.outbox_id, None)]


def test_successive_patches_raise_the_version_one_by_one(
    client: TestClient, store: FakeWriteStore, todo: Todo
) -> None:
    versions = [
        patch(client, "/7", {"status": s}).json()["version"] for s in ("IN_PROGRESS", "FINISHED", "CANCELED")
    ]

    assert versions == [4, 5, 6]
    assert [e.version for e in store.events] == [4, 5, 6]


def test_patch_that_changes_nothing_answers_200_same_version_and_publishes_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    response = patch(client, "/7", {"title": "buy milk", "status": "CREATED"})

    assert response.status_code == 200
    assert response.headers["ETag"] == '"3"'
    assert response.json() == todo.to_dict()
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("if_match", ['"3"', "*", ' "3" ', '"1", *', '"2", "3"'])
def test_matching_if_match_lets_the_change_through(client: TestClient, todo: Todo, if_match: str) -> None:
    response = patch(client, "/7", {"status": "FINISHED"}, **{"If-Match": if_match})

    assert response.status_code == 200
    assert response.json()["version"] == 4


@pytest.mark.parametrize(
    "if_match",
    [
        '"2"',
        '"4"',
        '"abc"',
        '""',
        '"1", "2"',
        'W/"3"',
        '"٣"',
        '"３"',
        '"³"',
        f'"{"3" * 5000}"',
        '"03"',
        '"+3"',
    ],
)
def test_if_match_mismatch_answers_412_and_changes_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, if_match: str
) -> None:
    """Also a weak tag and another spelling of the version ("03": If-Match compares the tags strongly,
    as the ETag writes them), and versions in other digits than ASCII."""
    response = patch(client, "/7", {"status": "FINISHED"}, **{"If-Match": if_match.encode()})

    assert_error(response, 412, "version_mismatch")
    assert_unchanged(store, published, todo)


def test_unknown_todo_answers_404(client: TestClient, store: FakeWriteStore, todo: Todo) -> None:
    assert_error(patch(client, "/8", {"status": "FINISHED"}), 404, "not_found")
    assert store.outbox == []


def test_the_largest_id_of_the_id_column_is_an_id_no_todo_has_404(client: TestClient) -> None:
    todo_id = 2**63 - 1
    assert_error(patch(client, f"/{todo_id}", {"status": "FINISHED"}), 404, "not_found")


@pytest.mark.parametrize("todo_id", [2**63, 10**19 - 1, 10**20])
def test_id_beyond_the_id_column_answers_400(client: TestClient, todo_id: int) -> None:
    assert_error(patch(client, f"/{todo_id}", {"status": "FINISHED"}), 400, "bad_request")


@pytest.mark.parametrize("path", ["/foo/bar", "/todo/7/x", "/", "/todo"])
def test_unknown_path_answers_404(client: TestClient, todo: Todo, path: str) -> None:
    assert_error(patch(client, path, {"status": "FINISHED"}), 404, "not_found")


@pytest.mark.parametrize(
    "segment",
    ["abc", "0", "-1", "1.5", "00", "+1", "%C2%B3", "1e3", "1_0", "%D9%A1%D9%A0", "%EF%BC%91", "7%20"],
)
@pytest.mark.parametrize("prefix", ["", "/todo"])
def test_id_that_is_not_a_positive_integer_in_ascii_digits_answers_400(
    client: TestClient,
    store: FakeWriteStore,
    published: PublishRecorder,
    todo: Todo,
    prefix: str,
    segment: str,
) -> None:
    assert_error(patch(client, f"{prefix}/{segment}", {"status": "FINISHED"}), 400, "bad_request")
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("method", ["PUT", "GET", "POST", "DELETE"])
def test_other_methods_on_a_todo_answer_405_with_allow(
    client: TestClient, store: FakeWriteStore, todo: Todo, method: str
) -> None:
    response = client.request(method, "/todo/7", json={"status": "FINISHED"})

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
        ({"status": ["FINISHED"]}, "status"),
        ({"version": 9}, "version"),
        ({"status": "FINISHED", "colour": "red"}, "colour"),
    ],
)
def test_patch_breaking_a_rule_answers_422_naming_the_field_and_changes_nothing(
    client: TestClient,
    store: FakeWriteStore,
    published: PublishRecorder,
    todo: Todo,
    body: dict[str, Any],
    field: str,
) -> None:
    error = assert_error(patch(client, "/7", body), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == [field]
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize(
    ("raw", "field"), [(b'{"title": "\\ud800"}', "title"), (b'{"description": "\\udc00"}', "description")]
)
def test_string_with_a_lone_surrogate_answers_422_naming_the_field(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, raw: bytes, field: str
) -> None:
    error = assert_error(patch_raw(client, raw), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == [field]
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("raw", [b"{", b"", b"nope", b"\xff", b"[" * 65 + b"]" * 65])
def test_body_that_is_not_valid_json_answers_400(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, raw: bytes
) -> None:
    assert_error(patch_raw(client, raw), 400, "bad_request")
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("body", [[{"status": "FINISHED"}], "FINISHED", 3, None])
def test_json_that_is_not_an_object_answers_400(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, body: Any
) -> None:
    assert_error(patch(client, "/7", body), 400, "bad_request")
    assert_unchanged(store, published, todo)


def test_text_plain_body_answers_415(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    assert_error(patch_raw(client, b'{"status": "FINISHED"}', "text/plain"), 415, "unsupported_media_type")
    assert_unchanged(store, published, todo)


def test_body_larger_than_64_kib_answers_413(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    assert_error(patch(client, "/7", {"description": "d" * (64 * 1024)}), 413, "payload_too_large")
    assert_unchanged(store, published, todo)


def test_write_store_unreachable_answers_503_with_retry_after(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    store.unreachable = True

    response = patch(client, "/7", {"status": "FINISHED"})

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert_unchanged(store, published, todo)


def test_failure_after_the_save_rolls_the_change_back(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    store.fail_in = "append_events"

    assert_error(patch(client, "/7", {"status": "FINISHED"}), 503, "dependency_unavailable")

    assert_unchanged(store, published, todo)


def test_patch_after_the_todo_was_deleted_answers_404(
    client: TestClient, store: FakeWriteStore, todo: Todo
) -> None:
    del store.todos[7]

    assert_error(patch(client, "/7", {"status": "FINISHED"}), 404, "not_found")


def test_status_change_is_kept_as_the_enum(client: TestClient, store: FakeWriteStore, todo: Todo) -> None:
    patch(client, "/7", {"status": "IN_PROGRESS"})

    assert store.todos[7].status is Status.IN_PROGRESS


# --- Idempotency-Key ----------------------------------------------------------------------------


def test_repeat_with_the_same_key_and_body_answers_exactly_the_first_answer_and_changes_nothing(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    first = patch(client, "/7", {"status": "FINISHED"}, **{"Idempotency-Key": "k"})
    # Meanwhile another client changes the todo again: the repeat still answers the first answer.
    patch(client, "/7", {"status": "CANCELED"})

    repeat = patch(client, "/7", {"status": "FINISHED"}, **{"Idempotency-Key": "k"})

    assert (first.status_code, repeat.status_code) == (200, 200)
    assert repeat.content == first.content
    assert repeat.headers["ETag"] == first.headers["ETag"] == '"4"'
    assert [e.version for e in store.events] == [4, 5] and published.calls == 2
    assert store.todos[7].status is Status.CANCELED


def test_repeat_of_a_412_is_not_remembered(client: TestClient, store: FakeWriteStore, todo: Todo) -> None:
    """A failed request stores nothing: the same key with the same request runs again."""
    headers = {"Idempotency-Key": "k", "If-Match": '"4"'}
    assert_error(patch(client, "/7", {"status": "FINISHED"}, **headers), 412, "version_mismatch")
    store.seed(a_todo(7, title="buy milk", version=4))

    assert patch(client, "/7", {"status": "FINISHED"}, **headers).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/7", {"status": "CANCELED"}, {}),
        ("/8", {"status": "FINISHED"}, {}),
        ("/7", {"status": "FINISHED"}, {"If-Match": '"3"'}),
    ],
    ids=["other-body", "other-todo", "other-if-match"],
)
def test_same_key_with_another_request_answers_422(
    client: TestClient,
    store: FakeWriteStore,
    todo: Todo,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    store.seed(a_todo(8))
    patch(client, "/7", {"status": "FINISHED"}, **{"Idempotency-Key": "k"})

    response = patch(client, path, body, **{"Idempotency-Key": "k", **headers})

    assert_error(response, 422, "idempotency_key_reused")
    assert len(store.outbox) == 1


def test_key_in_flight_answers_409_with_retry_after(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    store.hold_key("k")

    response = patch(client, "/7", {"status": "FINISHED"}, **{"Idempotency-Key": "k"})

    assert_error(response, 409, "idempotency_key_in_flight")
    assert int(response.headers["Retry-After"]) >= 1
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_empty_or_too_long_key_answers_400(
    client: TestClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, key: str
) -> None:
    assert_error(patch(client, "/7", {"status": "FINISHED"}, **{"Idempotency-Key": key}), 400, "bad_request")
    assert_unchanged(store, published, todo)
