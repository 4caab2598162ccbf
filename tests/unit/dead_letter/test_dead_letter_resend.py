"""Re-sending dead letters to a small local HTTP server that stands in for project_event."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from todo_cqrs.dead_letter.__main__ import main
from todo_cqrs.dead_letter.resend import resend
from todo_cqrs.dead_letter.store import DeadLetter, DirectoryDeadLetterStore, from_settings
from todo_cqrs.settings import settings

ORIGINAL = {
    "specversion": "1.0",
    "id": "3f0c5f5e-7a51-4a1b-9f57-0d2f1f0c9a11",
    "source": "/todo-cqrs/commands",
    "type": "todo.created.v1",
    "subject": "7",
    "time": "2026-11-27T10:00:00.123Z",
    "datacontenttype": "application/json",
}
ERROR = {
    "knativeerrordest": "http://project-event.todo.svc.cluster.local",
    "knativeerrorcode": "503",
    "knativeerrordata": "ZG93bg==",
}
BODY = b'{"id": 7, "title": "buy milk", "version": 1}'


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeProjectEvent:
    """Records every POST and answers with `status` (200 unless a test says otherwise)."""

    url: str
    status: int = 200
    requests: list[Recorded] = field(default_factory=list)


@pytest.fixture
def project_event() -> Iterator[FakeProjectEvent]:
    fake = FakeProjectEvent(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the name http.server dispatches to)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {name.lower(): value for name, value in self.headers.items()}
            fake.requests.append(Recorded(self.path, headers, body))
            self.send_response(fake.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path: Path) -> DirectoryDeadLetterStore:
    return DirectoryDeadLetterStore(tmp_path / "dead-letters")


def test_resend_posts_the_original_event_without_error_extensions_then_deletes_it(
    store: DirectoryDeadLetterStore, project_event: FakeProjectEvent
) -> None:
    key = store.put(DeadLetter({**ORIGINAL, **ERROR}, BODY))

    report = resend(store, project_event.url)

    [request] = project_event.requests
    assert {name: request.headers[f"ce-{name}"] for name in ORIGINAL if name != "datacontenttype"} == {
        name: value for name, value in ORIGINAL.items() if name != "datacontenttype"
    }
    assert request.headers["content-type"] == "application/json"
    assert not [name for name in request.headers if name.startswith("ce-knativeerror")]
    assert request.body == BODY
    assert report.sent == [key] and report.kept == {}
    assert store.list() == []


def test_letter_is_kept_when_project_event_answers_5xx(
    store: DirectoryDeadLetterStore, project_event: FakeProjectEvent
) -> None:
    key = store.put(DeadLetter({**ORIGINAL, **ERROR}, BODY))
    project_event.status = 503

    report = resend(store, project_event.url)

    assert len(project_event.requests) == 1
    assert report.sent == [] and "503" in report.kept[key]
    assert store.list() == [key]


def test_letter_is_kept_when_project_event_is_unreachable(store: DirectoryDeadLetterStore) -> None:
    key = store.put(DeadLetter({**ORIGINAL, **ERROR}, BODY))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    report = resend(store, f"http://127.0.0.1:{closed_port}/", timeout_s=2)

    assert key in report.kept
    assert store.list() == [key]


def test_resend_of_one_key_leaves_the_others(
    store: DirectoryDeadLetterStore, project_event: FakeProjectEvent
) -> None:
    first = store.put(DeadLetter({**ORIGINAL, "id": "a", **ERROR}, BODY))
    second = store.put(DeadLetter({**ORIGINAL, "id": "b", **ERROR}, BODY))

    report = resend(store, project_event.url, keys=[second, "20260101T000000.000000Z-gone-00000000.json"])

    assert [r.headers["ce-id"] for r in project_event.requests] == ["b"]
    assert report.sent == [second] and len(report.kept) == 1
    assert store.list() == [first]


def test_resend_keeps_non_utf8_data_and_an_event_without_time_as_they_were(
    store: DirectoryDeadLetterStore, project_event: FakeProjectEvent
) -> None:
    attributes = {k: v for k, v in ORIGINAL.items() if k != "time"}
    attributes["datacontenttype"] = "application/octet-stream"
    store.put(DeadLetter({**attributes, **ERROR}, b"\x00\xff\x80"))

    resend(store, project_event.url)

    [request] = project_event.requests
    assert request.body == b"\x00\xff\x80"
    assert "ce-time" not in request.headers


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[DirectoryDeadLetterStore]:
    """The CLI reads its store and project_event URL from the environment, like the function."""
    monkeypatch.setenv("DEAD_LETTER_STORE", "dir")
    monkeypatch.setenv("DEAD_LETTER_DIR", str(tmp_path / "cli-letters"))
    settings.cache_clear()
    from_settings.cache_clear()
    yield DirectoryDeadLetterStore(tmp_path / "cli-letters")
    settings.cache_clear()
    from_settings.cache_clear()


def test_cli_lists_one_line_per_letter(
    cli_env: DirectoryDeadLetterStore, capsys: pytest.CaptureFixture[str]
) -> None:
    key = cli_env.put(DeadLetter({**ORIGINAL, **ERROR}, BODY))

    assert main(["list"]) == 0

    assert capsys.readouterr().out.splitlines() == [
        "\t".join([key, ORIGINAL["id"], "todo.created.v1", "7", "503", ERROR["knativeerrordest"]])
    ]


def test_cli_resend_uses_project_event_url_and_reports_counts(
    cli_env: DirectoryDeadLetterStore,
    project_event: FakeProjectEvent,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PROJECT_EVENT_URL", project_event.url)
    settings.cache_clear()
    cli_env.put(DeadLetter({**ORIGINAL, **ERROR}, BODY))

    assert main(["resend"]) == 0

    assert "sent 1, kept 0" in capsys.readouterr().err
    assert cli_env.list() == []


def test_cli_resend_exits_non_zero_when_a_letter_is_kept(
    cli_env: DirectoryDeadLetterStore, project_event: FakeProjectEvent
) -> None:
    key = cli_env.put(DeadLetter({**ORIGINAL, **ERROR}, BODY))
    project_event.status = 500

    assert main(["resend", "--key", key, "--url", project_event.url]) == 1

    assert cli_env.list() == [key]
