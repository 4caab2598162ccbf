"""delete_todo through functions-framework's Flask app, with a fake in-memory write store and publisher."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from tests.unit.fakes import FakeWriteStore, PublishRecorder, a_todo, assert_error
from todo_cqrs.domain.todo import Status, Todo, parse_time

FUNCTION = "delete_todo"
pytestmark = pytest.mark.usefixtures("store", "published")  # every test on the fakes


@pytest.fixture
def todo(store: FakeWriteStore) -> Todo:
    store.seed(a_todo(3))
    return store.seed(a_todo(7, title="buy milk", status=Status.IN_PROGRESS, version=5))


def assert_unchanged(store: FakeWriteStore, published: PublishRecorder, todo: Todo) -> None:
    assert store.todos[todo.id] == todo and len(store.todos) == 2
    assert store.outbox == [] and published.calls == 0


@pytest.mark.parametrize("path", ["/7", "/todo/7", "/todo/7/"])
def test_delete_answers_200_with_the_todo_as_it_was_on_both_paths(
    client: FlaskClient, todo: Todo, path: str
) -> None:
    response = client.delete(path)

    assert response.status_code == 200
    assert response.get_json() == todo.to_dict()
    assert response.headers["ETag"] == '"5"'


def test_delete_removes_only_that_todo_and_records_its_deleted_event_then_publishes(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    client.delete("/7")

    assert list(store.todos) == [3]
    [event] = store.outbox
    assert (event.type, event.todo_id, event.version) == ("todo.deleted.v1", 7, 6)
    assert event.data["id"] == 7 and event.data["version"] == 6
    assert parse_time(event.data["deleted_at"]) == event.time
    assert published.calls == 1


def test_deleted_todo_is_gone_for_the_next_delete(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    assert client.delete("/7").status_code == 200

    assert_error(client.delete("/7"), 404, "not_found")
    assert len(store.outbox) == 1 and published.calls == 1


@pytest.mark.parametrize("if_match", ['"5"', "*"])
def test_matching_if_match_deletes(
    client: FlaskClient, store: FakeWriteStore, todo: Todo, if_match: str
) -> None:
    response = client.delete("/7", headers={"If-Match": if_match})

    assert response.status_code == 200
    assert 7 not in store.todos


@pytest.mark.parametrize("if_match", ['"4"', '"6"', '"x"', '"4", "6"'])
def test_if_match_mismatch_answers_412_and_deletes_nothing(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, if_match: str
) -> None:
    response = client.delete("/7", headers={"If-Match": if_match})

    assert_error(response, 412, "version_mismatch")
    assert_unchanged(store, published, todo)


def test_unknown_todo_answers_404_and_deletes_nothing(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    assert_error(client.delete("/8"), 404, "not_found")
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("path", ["/foo/bar", "/todo/7/x", "/", "/todo"])
def test_unknown_path_answers_404(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, path: str
) -> None:
    assert_error(client.delete(path), 404, "not_found")
    assert_unchanged(store, published, todo)


@pytest.mark.parametrize("segment", ["abc", "0", "-1", "1.5", "7a", " 7"])
@pytest.mark.parametrize("prefix", ["", "/todo"])
def test_id_that_is_not_a_positive_integer_answers_400(
    client: FlaskClient,
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
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo, method: str
) -> None:
    response = client.open("/todo/7", method=method)

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "DELETE"
    assert_unchanged(store, published, todo)


def test_write_store_unreachable_answers_503_with_retry_after(
    client: FlaskClient, store: FakeWriteStore, published: PublishRecorder, todo: Todo
) -> None:
    store.unreachable = True

    response = client.delete("/7")

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert_unchanged(store, published, todo)
