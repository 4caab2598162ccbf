"""project_event built with fakes of the read store and the cache passed in (tests/unit/fakes_read.py).

Events are posted the way a KafkaSource delivers them: binary-mode CloudEvents over HTTP (a few in
structured mode). The statuses are what the KafkaSource acts on: 2xx done, 400 dead-lettered without
retries, 5xx retried.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from starlette.testclient import TestClient

from tests.unit.fakes import (
    CREATED,
    DELETED,
    UPDATED,
    a_todo,
    assert_error,
    binary_event,
    log_lines,
    structured_event,
    todo_data,
)
from tests.unit.fakes_read import FakeCache, FakeReadStore
from todo_cqrs import db
from todo_cqrs.domain.clock import parse_time

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

FUNCTION = "project_event"
DEPS = "projection"


def event_data(event_type: str, todo_id: int, version: int, **fields: Any) -> dict[str, Any]:
    return (
        {"id": todo_id, "version": version}
        if event_type == DELETED
        else todo_data(todo_id, version, **fields)
    )


def post(client: TestClient, event_type: str, data: Any, **headers: str) -> Any:
    event_headers, body = binary_event(event_type, data, **headers)
    return client.post("/", content=body, headers=event_headers)


def send(client: TestClient, event_type: str, todo_id: int, version: int, **fields: Any) -> Any:
    response = post(client, event_type, event_data(event_type, todo_id, version, **fields))
    assert 200 <= response.status_code < 300, (response.status_code, response.content)
    return response


def live(read_model: FakeReadStore, todo_id: int) -> tuple[int, str] | None:
    """(version, title) of a live row; None when absent or a tombstone."""
    todo, version = read_model.rows.get(todo_id, (None, None))
    return (version, todo.title) if todo is not None and version is not None else None


# --- applying -----------------------------------------------------------------------------------


def test_created_event_is_applied_and_answers_200(client: TestClient, read_model: FakeReadStore) -> None:
    response = post(client, CREATED, todo_data(7, 1, title="buy milk", description="two litres"))

    assert (response.status_code, response.json()) == (200, {"outcome": "applied"})
    todo, version = read_model.rows[7]
    assert todo is not None and version == 1
    assert (todo.title, todo.description, todo.status.value) == ("buy milk", "two litres", "CREATED")


@pytest.mark.parametrize("path", ["/", "/todo-events", "/any/path"])
def test_event_on_any_path_is_applied(client: TestClient, read_model: FakeReadStore, path: str) -> None:
    headers, body = binary_event(CREATED, todo_data(7, 1))

    assert client.post(path, content=body, headers=headers).status_code == 200
    assert live(read_model, 7) == (1, "v1")


def test_structured_mode_event_is_applied(client: TestClient, read_model: FakeReadStore) -> None:
    headers, body = structured_event(CREATED, todo_data(7, 1), subject="7")

    response = client.post("/", content=body, headers=headers)

    assert response.status_code == 200, response.content
    assert live(read_model, 7) == (1, "v1")


def test_structured_mode_event_with_base64_data_is_applied(
    client: TestClient, read_model: FakeReadStore
) -> None:
    envelope = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "/s",
        "type": CREATED,
        "datacontenttype": "application/json",
        "data_base64": base64.b64encode(json.dumps(todo_data(7, 1)).encode()).decode(),
    }

    response = client.post(
        "/", content=json.dumps(envelope), headers={"content-type": "application/cloudevents+json"}
    )

    assert response.status_code == 200, response.content
    assert live(read_model, 7) == (1, "v1")


def test_update_is_applied(client: TestClient, read_model: FakeReadStore) -> None:
    send(client, CREATED, 7, 1)
    send(client, UPDATED, 7, 2, title="renamed", status="FINISHED")

    todo, _ = read_model.rows[7]
    assert todo is not None and (todo.version, todo.title, todo.status.value) == (2, "renamed", "FINISHED")


def test_duplicate_event_answers_2xx_skipped_and_changes_nothing(
    client: TestClient, read_model: FakeReadStore
) -> None:
    send(client, CREATED, 7, 1)
    send(client, UPDATED, 7, 2, title="second")

    redelivered = post(client, UPDATED, event_data(UPDATED, 7, 2, title="second"))
    # The same version with other content is still a duplicate: the version decides, not the payload.
    same_version = post(client, UPDATED, event_data(UPDATED, 7, 2, title="not this"))

    assert (redelivered.status_code, same_version.status_code) == (200, 200)
    assert redelivered.json() == same_version.json() == {"outcome": "skipped"}
    assert live(read_model, 7) == (2, "second")


def test_older_version_answers_2xx_and_changes_nothing(client: TestClient, read_model: FakeReadStore) -> None:
    send(client, CREATED, 7, 1)
    send(client, UPDATED, 7, 3, title="newest")

    assert send(client, UPDATED, 7, 2, title="stale").json() == {"outcome": "skipped"}
    send(client, CREATED, 7, 1, title="very stale")

    assert live(read_model, 7) == (3, "newest")


def test_out_of_order_events_keep_the_newest(client: TestClient, read_model: FakeReadStore) -> None:
    send(client, UPDATED, 7, 3, title="third")
    send(client, UPDATED, 7, 2, title="second")
    send(client, CREATED, 7, 1, title="first")

    assert live(read_model, 7) == (3, "third")


def test_stale_event_does_not_resurrect_deleted_todo(client: TestClient, read_model: FakeReadStore) -> None:
    send(client, CREATED, 7, 1)
    send(client, DELETED, 7, 3)

    assert send(client, UPDATED, 7, 2, title="late").json() == {"outcome": "skipped"}

    assert read_model.rows[7] == (None, 3)


def test_created_arriving_after_deleted_stays_deleted(client: TestClient, read_model: FakeReadStore) -> None:
    send(client, DELETED, 7, 2)
    send(client, CREATED, 7, 1)

    assert read_model.rows[7] == (None, 2)


def test_tombstone_is_stamped_with_the_events_time(client: TestClient, read_model: FakeReadStore) -> None:
    send(client, DELETED, 7, 2)

    [(change, moment)] = read_model.applied
    assert change.deleted and moment == parse_time("2026-11-27T10:01:00.000Z")


@pytest.mark.parametrize(("field", "value"), [("id", 2**63 - 1), ("version", 2**31 - 1)])
def test_id_and_version_at_their_columns_limits_are_applied(
    client: TestClient, read_model: FakeReadStore, field: str, value: int
) -> None:
    data = {"id": 7, "version": 2, field: value}

    assert post(client, DELETED, data).status_code == 200
    assert read_model.rows[data["id"]] == (None, data["version"])


# --- invalidation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held_version", "event_version"), [(1, 2), (2, 2), (3, 2)], ids=["newer", "duplicate", "older"]
)
def test_every_accepted_event_invalidates_the_todo_and_the_lists(
    client: TestClient, read_model: FakeReadStore, cache: FakeCache, held_version: int, event_version: int
) -> None:
    read_model.put(a_todo(7, version=held_version))

    send(client, UPDATED, 7, event_version)

    assert [(todo_id, version) for todo_id, version, _ in cache.invalidations] == [(7, event_version)]
    assert cache.generation == 1


def test_rejected_event_invalidates_nothing(client: TestClient, cache: FakeCache) -> None:
    assert post(client, CREATED, {"id": 7}).status_code == 400

    assert cache.invalidations == []


def test_redis_down_answers_503_after_applying_and_the_retry_invalidates(
    client: TestClient, cache: FakeCache, read_model: FakeReadStore
) -> None:
    cache.unreachable = True
    data = event_data(UPDATED, 7, 2, title="while redis was down")

    response = post(client, UPDATED, data)

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert live(read_model, 7) == (2, "while redis was down")  # committed before the invalidation failed
    cache.unreachable = False  # Redis is back
    assert post(client, UPDATED, data).json() == {"outcome": "skipped"}  # the KafkaSource's retry
    assert [(i, v) for i, v, _ in cache.invalidations] == [(7, 2)]


# --- events that can never be applied -----------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"content-type": "application/json"}, json.dumps(todo_data(7, 1)).encode()),
        ({"content-type": "text/plain"}, b"hello"),
        ({}, b""),
        ({"content-type": "application/cloudevents+json"}, b"{not json"),
        ({"content-type": "application/cloudevents+json"}, b"[1]"),
        ({"ce-specversion": "1.0", "ce-type": CREATED, "content-type": "application/json"}, b"{}"),
        ({"ce-specversion": "0.1", "ce-id": "1", "ce-source": "/s", "ce-type": CREATED}, b"{}"),
    ],
    ids=[
        "plain-json",
        "text",
        "empty",
        "structured-not-json",
        "structured-not-object",
        "no-id",
        "bad-specversion",
    ],
)
def test_request_that_is_not_a_cloud_event_is_400_invalid_event(
    client: TestClient, read_model: FakeReadStore, headers: dict[str, str], body: bytes
) -> None:
    assert_error(client.post("/", content=body, headers=headers), 400, "invalid_event")
    assert read_model.rows == {}


NEVER_APPLICABLE: dict[str, tuple[str, Callable[[], Any]]] = {
    "unknown-type": ("todo.renamed.v1", lambda: todo_data(7, 1)),
    "no-id": (CREATED, lambda: {k: v for k, v in todo_data(7, 1).items() if k != "id"}),
    "no-version": (UPDATED, lambda: {k: v for k, v in todo_data(7, 2).items() if k != "version"}),
    "deleted-without-version": (DELETED, lambda: {"id": 7}),
    "version-zero": (UPDATED, lambda: todo_data(7, 0)),
    "version-string": (UPDATED, lambda: {**todo_data(7, 2), "version": "2"}),
    "version-2**31": (UPDATED, lambda: todo_data(7, 2**31)),
    "version-2**40": (DELETED, lambda: {"id": 7, "version": 2**40}),
    "id-2**63": (DELETED, lambda: {"id": 2**63, "version": 1}),
    "id-2**64": (CREATED, lambda: todo_data(2**64, 1)),
    "id-5000-digits": (DELETED, lambda: b'{"id": ' + b"9" * 5000 + b', "version": 1}'),
    "id-float": (DELETED, lambda: {"id": 7.0, "version": 1}),
    "id-bool": (DELETED, lambda: {"id": True, "version": 1}),
    "not-a-whole-todo": (CREATED, lambda: {"id": 7, "version": 1}),
    "unknown-status": (CREATED, lambda: todo_data(7, 1, status="DONE")),
    "title-too-long": (CREATED, lambda: todo_data(7, 1, title="t" * 256)),
    "lone-surrogate-title": (CREATED, lambda: json.dumps(todo_data(7, 1, title="\ud800")).encode()),
    "data-not-json": (CREATED, lambda: b"{not json"),
    "data-not-utf8": (CREATED, lambda: b'{"id": 7, "version": 1, "title": "\xff"}'),
    "data-not-an-object": (CREATED, lambda: [todo_data(7, 1)]),
    "data-nested-deeply": (DELETED, lambda: b"[" * 5000 + b"]" * 5000),
}


@pytest.mark.parametrize("case", list(NEVER_APPLICABLE))
def test_event_that_can_never_be_applied_is_400_for_the_dead_letter_sink(
    client: TestClient, read_model: FakeReadStore, cache: FakeCache, case: str
) -> None:
    event_type, make_data = NEVER_APPLICABLE[case]

    response = post(client, event_type, make_data())

    assert_error(response, 400, "invalid_event")
    assert read_model.rows == {} and cache.invalidations == []


@pytest.mark.parametrize(
    "refusal",
    [
        DataError("INSERT INTO todos_view", {}, Exception(1406, "Data too long for column 'title'")),
        IntegrityError("INSERT INTO todos_view", {}, Exception(1048, "Column 'title' cannot be null")),
    ],
    ids=["data-error", "integrity-error"],
)
def test_event_the_read_db_refuses_is_400_not_retried(
    client: TestClient, read_model: FakeReadStore, cache: FakeCache, refusal: Exception
) -> None:
    read_model.fail_with = refusal

    response = post(client, CREATED, todo_data(7, 1))

    error = assert_error(response, 400, "invalid_event")
    assert "refuses" in error["message"]
    assert cache.invalidations == []


# --- dependencies down --------------------------------------------------------------------------


def test_read_db_down_is_503_and_the_retry_applies(client: TestClient, read_model: FakeReadStore) -> None:
    read_model.unreachable = True
    data = todo_data(7, 1)

    response = post(client, CREATED, data)

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"
    read_model.unreachable = False
    assert post(client, CREATED, data).status_code == 200  # the KafkaSource's retry
    assert live(read_model, 7) == (1, "v1")


def test_read_db_lost_mid_statement_is_503(client: TestClient, read_model: FakeReadStore) -> None:
    read_model.fail_with = db.unavailable("read", OperationalError("INSERT", {}, ConnectionError("lost")))

    assert_error(post(client, CREATED, todo_data(7, 1)), 503, "dependency_unavailable")


# --- trace context ------------------------------------------------------------------------------


def test_event_continues_the_trace_of_its_traceparent_extension(
    client: TestClient, cache: FakeCache, capfd: pytest.CaptureFixture[str]
) -> None:
    post(client, CREATED, todo_data(7, 1), **{"ce-traceparent": PARENT, "ce-tracestate": "k=v"})

    [line] = [line for line in log_lines(capfd) if line.get("event_type") == CREATED]
    assert line["trace_id"] == TRACE_ID and line["span_id"] != PARENT.split("-")[2]
    [(_, _, traceparent)] = cache.invalidations
    assert traceparent == f"00-{TRACE_ID}-{line['span_id']}-01"


def test_event_without_the_extension_continues_the_http_traceparent(
    client: TestClient, capfd: pytest.CaptureFixture[str]
) -> None:
    post(client, CREATED, todo_data(7, 1), traceparent=PARENT)

    [line] = [line for line in log_lines(capfd) if line.get("event_type") == CREATED]
    assert line["trace_id"] == TRACE_ID


def test_each_event_is_logged_as_one_json_line_with_its_outcome(
    client: TestClient, capfd: pytest.CaptureFixture[str]
) -> None:
    post(client, CREATED, todo_data(7, 1), **{"ce-id": "event-1"})
    post(client, CREATED, todo_data(7, 1), **{"ce-id": "event-2"})

    lines = {line["event_id"]: line for line in log_lines(capfd) if "event_id" in line}
    assert (lines["event-1"]["outcome"], lines["event-1"]["status"]) == ("applied", 200)
    assert (lines["event-2"]["outcome"], lines["event-2"]["status"]) == ("skipped", 200)
    assert lines["event-1"]["todo_id"] == 7 and lines["event-1"]["version"] == 1


# --- the HTTP edge of the sink ------------------------------------------------------------------


def test_body_larger_than_64_kib_is_413(client: TestClient, read_model: FakeReadStore) -> None:
    headers, body = binary_event(CREATED, todo_data(7, 1, description="d" * (64 * 1024)))

    assert_error(client.post("/", content=body, headers=headers), 413, "payload_too_large")
    assert read_model.rows == {}


def test_chunked_body_larger_than_64_kib_is_413(client: TestClient, read_model: FakeReadStore) -> None:
    headers, body = binary_event(CREATED, todo_data(7, 1, description="d" * (64 * 1024)))

    response = client.post("/", content=iter([body[:1000], body[1000:]]), headers=headers)

    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")
    assert read_model.rows == {}


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_path_answers_200_without_the_read_db_or_redis(
    client: TestClient, cache: FakeCache, read_model: FakeReadStore, path: str
) -> None:
    read_model.unreachable = True
    cache.unreachable = True

    response = client.get(path)

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("PUT", "/"), ("DELETE", "/7"), ("PATCH", "/x")])
def test_other_methods_answer_405_with_allow_post(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"
