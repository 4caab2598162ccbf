"""The resend re-sends to project_event only what project_event could not take, and presents a token
of the event source when it has one (sender identity)."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from tests.unit.dead_letter import test_dead_letter_resend as resend_tests
from tests.unit.dead_letter.test_dead_letter_resend import BODY, ERROR, ORIGINAL, FakeProjectEvent
from todo_cqrs.dead_letter.__main__ import authorization, main
from todo_cqrs.dead_letter.resend import resend
from todo_cqrs.dead_letter.store import DeadLetter, DirectoryDeadLetterStore, from_settings
from todo_cqrs.settings import settings

project_event = resend_tests.project_event  # the fake project_event and the store of those tests
store = resend_tests.store


def letter(destination: str | None) -> DeadLetter:
    errors = {**ERROR, "knativeerrordest": destination} if destination else {"knativeerrorcode": "400"}
    return DeadLetter({**ORIGINAL, **errors}, BODY)


@pytest.mark.parametrize(
    "destination",
    ["http://dead-letter.todo.svc.cluster.local", "http://relay-outbox.todo", "http://127.0.0.1:9/", None],
)
def test_a_letter_that_did_not_fail_at_project_event_is_kept_not_resent(
    store: DirectoryDeadLetterStore, project_event: FakeProjectEvent, destination: str | None
) -> None:
    key = store.put(letter(destination))

    report = resend(store, project_event.url)

    assert project_event.requests == []
    assert report.sent == [] and "not dead-lettered by project-event" in report.kept[key]
    assert store.list() == [key]


@pytest.mark.parametrize(
    "destination", ["http://project-event", "http://project-event.todo.svc.cluster.local"]
)
def test_a_letter_of_the_project_event_service_or_its_url_is_resent_with_the_token(
    store: DirectoryDeadLetterStore, project_event: FakeProjectEvent, destination: str
) -> None:
    by_service = store.put(letter(destination))
    by_url = store.put(letter(project_event.url.rstrip("/")))

    report = resend(store, project_event.url, authorization=lambda: "Bearer the-source-token")

    assert sorted(report.sent) == sorted([by_service, by_url]) and report.kept == {}
    assert [r.headers["authorization"] for r in project_event.requests] == ["Bearer the-source-token"] * 2


def test_cli_presents_the_token_of_its_token_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, project_event: FakeProjectEvent
) -> None:
    monkeypatch.setenv("DEAD_LETTER_STORE", "dir")
    monkeypatch.setenv("DEAD_LETTER_DIR", str(tmp_path / "letters"))
    settings.cache_clear()
    from_settings.cache_clear()
    from_settings().put(letter("http://project-event.todo.svc.cluster.local"))
    token_file = tmp_path / "token"
    token_file.write_text("projected-token\n")

    assert main(["resend", "--url", project_event.url, "--token-file", str(token_file)]) == 0

    assert [r.headers["authorization"] for r in project_event.requests] == ["Bearer projected-token"]


def test_locally_the_resend_presents_the_kafkasources_token_for_project_event() -> None:
    """project_event takes deliveries from its source only: a dead letter is the source's delivery,
    retried by hand, so the local resend presents the token the local KafkaSource presents."""
    from tools import issuer

    header = authorization("http://127.0.0.1:8085", None)
    assert header is not None
    scheme, token = header().split()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (scheme, claims["sub"], claims["aud"]) == ("Bearer", issuer.KAFKASOURCE_SUBJECT, ["project-event"])
    assert issuer.SENDERS["project-event"] == (issuer.KAFKASOURCE_SUBJECT,)
