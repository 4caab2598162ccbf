"""The dead_letter function, loaded by functions-framework's own create_asgi_app and driven by its test
client; its store is the directory backend on tmp_path. Built by its `build` instead, with the store other
settings name (a file where the directory should be, an S3 nobody serves) or an in-memory fake."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import assert_error, client_of, load_main, log_lines
from tests.unit.fakes_read import FakeDeadLetterStore
from todo_cqrs import bootstrap
from todo_cqrs.dead_letter import DeadLetters
from todo_cqrs.dead_letter.store import DirectoryDeadLetterStore
from todo_cqrs.settings import settings

FUNCTION = "dead_letter"

# What a KafkaSource POSTs to its dead-letter sink: the original event in binary mode plus the error.
DEAD_LETTERED = {
    "ce-specversion": "1.0",
    "ce-id": "3f0c5f5e-7a51-4a1b-9f57-0d2f1f0c9a11",
    "ce-source": "/todo-cqrs/commands",
    "ce-type": "todo.updated.v1",
    "ce-subject": "7",
    "ce-time": "2026-11-27T10:00:00.123Z",
    "ce-knativeerrordest": "http://project-event.todo.svc.cluster.local",
    "ce-knativeerrorcode": "400",
    "ce-knativeerrordata": "eyJlcnJvciI6eyJjb2RlIjoiaW52YWxpZF9ldmVudCJ9fQ==",
    "content-type": "application/json",
}
BODY = b'{"id": 7, "version": "three"}'


@pytest.fixture
def letters_dir(tmp_path: Path) -> Path:
    """Where the function's directory store keeps letters (the unit tests' DEAD_LETTER_DIR)."""
    return tmp_path / "dead-letters"


@contextmanager
def served_with(monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[TestClient]:
    """dead_letter with the store these settings name, built as its main.py builds it."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings.cache_clear()
    with client_of(load_main(FUNCTION).build(bootstrap.dead_letters(settings()))) as client:
        yield client


def stored(letters_dir: Path) -> list:
    store = DirectoryDeadLetterStore(letters_dir)
    return [store.get(key) for key in store.list()]


def test_binary_event_with_knative_error_extensions_is_stored_whole(
    client: TestClient, letters_dir: Path
) -> None:
    response = client.post("/", headers=DEAD_LETTERED, content=BODY)

    assert (response.status_code, response.json()) == (200, {"outcome": "stored"})
    [letter] = stored(letters_dir)
    expected = {name.removeprefix("ce-"): value for name, value in DEAD_LETTERED.items()}
    expected["datacontenttype"] = expected.pop("content-type")
    assert dict(letter.attributes) == expected
    assert letter.data == BODY


def test_event_without_time_is_stored_without_a_made_up_time(client: TestClient, letters_dir: Path) -> None:
    headers = {k: v for k, v in DEAD_LETTERED.items() if k != "ce-time"}

    assert client.post("/", headers=headers, content=BODY).status_code == 200

    [letter] = stored(letters_dir)
    assert "time" not in letter.attributes


@pytest.mark.parametrize(
    "data",
    [b"\x00\xff\xfe not utf-8", b"{not json", b"[" * 64 + b"]" * 64, b""],
    ids=["binary", "not-json", "nested", "empty"],
)
def test_event_whose_data_is_not_json_is_stored_byte_for_byte(
    client: TestClient, letters_dir: Path, data: bytes
) -> None:
    assert client.post("/", headers=DEAD_LETTERED, content=data).status_code == 200

    [letter] = stored(letters_dir)
    assert letter.data == (data or None)


@pytest.mark.parametrize(
    "data",
    [b"[" * 5000 + b"]" * 5000, b'{"id": ' + b"9" * 5000 + b"}"],
    ids=["nested-5000-levels", "integer-of-5000-digits"],
)
def test_event_whose_data_python_cannot_parse_is_stored_not_refused(
    client: TestClient, letters_dir: Path, data: bytes
) -> None:
    """A 400 from the dead-letter sink loses the event for good; its data needs no parsing to be kept."""
    response = client.post("/", headers=DEAD_LETTERED, content=data)

    assert response.status_code == 200, response.content
    [letter] = stored(letters_dir)
    assert letter.data == data


def test_structured_event_is_stored(client: TestClient, letters_dir: Path) -> None:
    envelope = {name.removeprefix("ce-"): v for name, v in DEAD_LETTERED.items() if name.startswith("ce-")}
    envelope["datacontenttype"] = "application/json"
    envelope["data"] = {"id": 7}

    response = client.post(
        "/", content=json.dumps(envelope), headers={"content-type": "application/cloudevents+json"}
    )

    assert response.status_code == 200
    [letter] = stored(letters_dir)
    assert letter.error_code == "400" and json.loads(letter.data or b"") == {"id": 7}


@pytest.mark.parametrize(
    ("attributes", "data"),
    [({"source": "\ud800"}, {"id": 7}), ({}, {"id": 7, "title": "\udfff"})],
    ids=["attribute", "data"],
)
def test_structured_event_holding_a_lone_surrogate_is_stored_as_it_came(
    client: TestClient, letters_dir: Path, attributes: dict[str, str], data: dict[str, object]
) -> None:
    """Valid JSON the sink cannot refuse (a 400 loses it) nor fail on (a 5xx is retried for ever)."""
    envelope = {"specversion": "1.0", "id": "e-1", "source": "/s", "type": "todo.created.v1", "data": data}
    envelope.update(attributes)

    response = client.post(
        "/", content=json.dumps(envelope), headers={"content-type": "application/cloudevents+json"}
    )

    assert response.status_code == 200, response.content
    [letter] = stored(letters_dir)
    assert letter.id == "e-1" and json.loads(letter.data or b"") == data
    assert {k: letter.attributes[k] for k in attributes} == attributes


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"ce-specversion": "1.0", "content-type": "application/json"}, b"{}"),
        ({"ce-specversion": "1.0", "ce-type": "todo.updated.v1"}, b"{}"),
        ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0"}'),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"specversion": "1.0", "id": "1", "source": "/s"}',
        ),
    ],
    ids=["binary-no-type", "binary-no-id", "structured-only-specversion", "structured-no-type"],
)
def test_event_missing_required_attributes_gets_a_final_json_answer_not_a_5xx(
    client: TestClient, headers: dict[str, str], body: bytes
) -> None:
    """Kept (2xx) or refused (4xx), but never a 5xx: the KafkaSource would retry that for ever."""
    response = client.post("/", headers=headers, content=body)

    assert 200 <= response.status_code < 500, (response.status_code, response.content)
    assert response.headers["content-type"] == "application/json"


def test_stored_event_is_logged_as_one_json_line(
    client: TestClient, capfd: pytest.CaptureFixture[str]
) -> None:
    client.post("/", headers=DEAD_LETTERED, content=BODY)

    [line] = [line for line in log_lines(capfd) if line.get("path") == "/"]
    assert line["event_id"] == DEAD_LETTERED["ce-id"]
    assert line["event_type"] == "todo.updated.v1"
    assert line["error_code"] == "400"
    assert line["status"] == 200 and line["outcome"] == "stored"


def test_request_that_is_not_a_cloud_event_is_400(client: TestClient, letters_dir: Path) -> None:
    response = client.post("/", content=b'{"id": 7}', headers={"content-type": "application/json"})

    assert_error(response, 400, "invalid_event")
    assert stored(letters_dir) == []


def test_body_larger_than_64_kib_is_413(client: TestClient, letters_dir: Path) -> None:
    assert_error(
        client.post("/", headers=DEAD_LETTERED, content=b"x" * (64 * 1024 + 1)), 413, "payload_too_large"
    )
    assert stored(letters_dir) == []


def test_unwritable_store_answers_503_so_the_event_is_retried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")

    with served_with(monkeypatch, DEAD_LETTER_STORE="dir", DEAD_LETTER_DIR=str(not_a_directory)) as client:
        response = client.post("/", headers=DEAD_LETTERED, content=BODY)

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"]


def test_unreachable_object_store_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    unreachable = served_with(
        monkeypatch,
        DEAD_LETTER_STORE="s3",
        DEAD_LETTER_S3_ENDPOINT=f"http://127.0.0.1:{closed_port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )

    with unreachable as client:
        response = client.post("/", headers=DEAD_LETTERED, content=BODY)

    assert_error(response, 503, "dependency_unavailable")


def test_the_letter_goes_to_the_store_the_function_is_given() -> None:
    fake = FakeDeadLetterStore()

    with client_of(load_main(FUNCTION).build(DeadLetters(fake))) as client:
        assert client.post("/", headers=DEAD_LETTERED, content=BODY).status_code == 200

    [letter] = fake.letters.values()
    assert letter.id == DEAD_LETTERED["ce-id"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_path_answers_ok(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_other_methods_answer_405_with_allow_post(client: TestClient, method: str) -> None:
    response = client.request(method, "/")

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"
