"""Sender identity on the running system (`make run`'s start-up): the receivers refuse a delivery that
does not come from their source, before reading it, while the local KafkaSource and the relay's tick,
which present the local issuer's tokens, keep events flowing end to end."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer

from todo_cqrs.dead_letter.store import from_settings
from todo_cqrs.settings import settings
from tools import issuer
from tools.topology import BY_NAME

NO_COMMAND_REACHES = 9_000_000_000_001  # a todo id no command assigns: nothing of the read model moves

pytestmark = pytest.mark.e2e


def post(url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def forged_update(todo_id: int, title: str, token: str | None = None) -> tuple[int, dict[str, str], Any]:
    """What an attacker in the cluster would send: an update of a real todo that wins every version."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": str(uuid.uuid4()),
        "ce-source": "/todo-cqrs/commands",
        "ce-type": "todo.updated.v1",
        "ce-subject": str(todo_id),
        "Content-Type": "application/json",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = {
        "id": todo_id,
        "title": title,
        "description": "",
        "status": "CREATED",
        "version": 2147483647,
        "created_at": "2026-11-27T10:00:00.000Z",
        "updated_at": "2026-11-27T10:00:00.000Z",
    }
    return post(f"{BY_NAME['project_event'].url}/", headers, data)


def test_project_event_refuses_senders_other_than_its_source_and_events_still_flow(gateway) -> None:
    created = gateway.request("POST", "/todo", {"title": "only the source may project me"})
    assert created.status == 201
    todo_id = created.body["id"]
    assert gateway.request("GET", f"/todo/{todo_id}?min_version=1").status == 200  # flowed, with tokens

    status, headers, body = forged_update(todo_id, "forged, no token")
    assert (status, body["error"]["code"]) == (401, "unauthenticated")
    assert headers["www-authenticate"].startswith("Bearer")
    for other in (  # any account in the cluster, the Jobs', the ticks'
        "system:serviceaccount:todo:default",
        "system:serviceaccount:todo:todo-cqrs-jobs",
        issuer.RELAY_TICK_SUBJECT,
        issuer.RECONCILE_TICK_SUBJECT,
    ):
        stranger = issuer.mint(other, "project-event", 60)
        assert forged_update(todo_id, "forged, another subject", stranger)[0] == 403, other
    for_dead_letter = issuer.mint(issuer.KAFKASOURCE_SUBJECT, "dead-letter", 60)
    assert forged_update(todo_id, "forged, another audience", for_dead_letter)[0] == 401

    updated = gateway.request("PATCH", f"/todo/{todo_id}", {"title": "changed through the API"})
    assert updated.status == 200 and updated.body["version"] == 2
    read = gateway.request("GET", f"/todo/{todo_id}?min_version=2")
    assert (read.status, read.body) == (200, updated.body)  # the forged events changed nothing


def test_relay_outbox_and_dead_letter_refuse_a_request_without_token(gateway) -> None:
    for name in ("relay_outbox", "dead_letter"):
        status, _, body = post(f"{BY_NAME[name].url}/", {"Content-Type": "application/json"}, {})
        assert (status, body["error"]["code"]) == (401, "unauthenticated"), name
        with urllib.request.urlopen(f"{BY_NAME[name].url}/healthz", timeout=5) as health:
            assert health.status == 200


def test_an_event_about_another_todo_than_its_subject_is_dead_lettered_by_the_sources_with_tokens(
    system,
) -> None:
    """project_event answers 400 (never applicable); the KafkaSource then delivers the event to
    dead_letter, which takes it only with the source's token for its own audience."""
    event_id = str(uuid.uuid4())
    producer = Producer({"bootstrap.servers": settings().kafka_bootstrap_servers, "linger.ms": 0})
    headers = {
        "ce_specversion": "1.0",
        "ce_id": event_id,
        "ce_source": "/todo-cqrs/commands",
        "ce_type": "todo.deleted.v1",
        "ce_subject": str(NO_COMMAND_REACHES + 1),  # not the data's id
        "content-type": "application/json",
    }
    data = {"id": NO_COMMAND_REACHES, "version": 2}
    producer.produce(
        settings().topic,
        key=str(NO_COMMAND_REACHES).encode(),
        value=json.dumps(data).encode(),
        headers=[(name, value.encode()) for name, value in headers.items()],
    )
    assert producer.flush(10) == 0

    store = from_settings()
    deadline = time.monotonic() + 60
    while not (keys := [key for key in store.list() if event_id in key]):
        assert time.monotonic() < deadline, "the event never reached the dead-letter store"
        time.sleep(0.2)
    (key,) = keys
    letter = store.get(key)
    try:
        assert (letter.error_code, letter.error_dest) == ("400", BY_NAME["project_event"].url)
        assert letter.subject == str(NO_COMMAND_REACHES + 1)
    finally:
        store.delete(key)
