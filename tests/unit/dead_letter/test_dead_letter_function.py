"""The dead_letter function, loaded by functions-framework's own create_app and driven by its test client."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from todo_cqrs.dead_letter.store import DirectoryDeadLetterStore, from_settings
from todo_cqrs.settings import settings

SOURCE = Path(__file__).resolve().parents[3] / "functions" / "dead_letter" / "main.py"

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


def client_for(monkeypatch: pytest.MonkeyPatch, **env: str) -> FlaskClient:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings.cache_clear()
    from_settings.cache_clear()
    return create_app("dead_letter", str(SOURCE)).test_client()


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    yield
    settings.cache_clear()
    from_settings.cache_clear()


@pytest.fixture
def letters_dir(tmp_path: Path) -> Path:
    return tmp_path / "dead-letters"


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, letters_dir: Path) -> FlaskClient:
    return client_for(monkeypatch, DEAD_LETTER_STORE="dir", DEAD_LETTER_DIR=str(letters_dir))


def test_binary_event_with_knative_error_extensions_is_stored_whole(
    client: FlaskClient, letters_dir: Path
) -> None:
    response = client.post("/", headers=DEAD_LETTERED, data=BODY)

    assert response.status_code == 200
    store = DirectoryDeadLetterStore(letters_dir)
    [key] = store.list()
    letter = store.get(key)
    expected = {name.removeprefix("ce-"): value for name, value in DEAD_LETTERED.items()}
    expected["datacontenttype"] = expected.pop("content-type")
    assert dict(letter.attributes) == expected
    assert letter.data == BODY


def test_event_without_time_is_stored_without_a_made_up_time(client: FlaskClient, letters_dir: Path) -> None:
    headers = {k: v for k, v in DEAD_LETTERED.items() if k != "ce-time"}

    assert client.post("/", headers=headers, data=BODY).status_code == 200

    store = DirectoryDeadLetterStore(letters_dir)
    assert "time" not in store.get(store.list()[0]).attributes


def test_structured_event_is_stored(client: FlaskClient, letters_dir: Path) -> None:
    envelope = {name.removeprefix("ce-"): v for name, v in DEAD_LETTERED.items() if name.startswith("ce-")}
    envelope["datacontenttype"] = "application/json"
    envelope["data"] = {"id": 7}

    response = client.post("/", json=envelope, headers={"content-type": "application/cloudevents+json"})

    assert response.status_code == 200
    store = DirectoryDeadLetterStore(letters_dir)
    letter = store.get(store.list()[0])
    assert letter.error_code == "400" and json.loads(letter.data or b"") == {"id": 7}


def test_stored_event_is_logged_as_one_json_line(
    client: FlaskClient, capsys: pytest.CaptureFixture[str]
) -> None:
    client.post("/", headers=DEAD_LETTERED, data=BODY)

    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["event_id"] == DEAD_LETTERED["ce-id"]
    assert line["event_type"] == "todo.updated.v1"
    assert line["error_code"] == "400"
    assert line["status"] == 200


def test_unwritable_store_answers_503_so_the_event_is_retried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    client = client_for(monkeypatch, DEAD_LETTER_STORE="dir", DEAD_LETTER_DIR=str(not_a_directory))

    response = client.post("/", headers=DEAD_LETTERED, data=BODY)

    assert response.status_code == 503
    assert response.headers["Retry-After"]


def test_unreachable_object_store_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    client = client_for(
        monkeypatch,
        DEAD_LETTER_STORE="s3",
        DEAD_LETTER_S3_ENDPOINT=f"http://127.0.0.1:{closed_port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )

    response = client.post("/", headers=DEAD_LETTERED, data=BODY)

    assert response.status_code == 503


def test_healthz_answers_ok(client: FlaskClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
