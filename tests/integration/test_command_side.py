"""The command side on the real write DB and Kafka: what the functions commit and what lands on the topic.

Every test creates its own todos and reads the topic from offsets noted before acting, keeping only the
records keyed by its own ids, so it shares the databases and the topic with anyone else safely.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import functions_framework
import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from flask.testing import FlaskClient

from todo_cqrs.adapters import publisher as publisher_module
from todo_cqrs.adapters.write_store import outbox, todos
from todo_cqrs.command import relay
from todo_cqrs.db import write_engine
from todo_cqrs.settings import settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

CLOSED_PORT = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
KAFKA_TIMEOUT_S = 20.0
RELAY_LOCK_WAIT_S = 10.0
JSON = {"Content-Type": "application/json"}


# --- the functions' apps ------------------------------------------------------------------------------


def _client(name: str) -> FlaskClient:
    return functions_framework.create_app(target=name, source=f"functions/{name}/main.py").test_client()


@pytest.fixture(scope="module")
def create() -> FlaskClient:
    return _client("create_todo")


@pytest.fixture(scope="module")
def update() -> FlaskClient:
    return _client("update_todo")


@pytest.fixture(scope="module")
def delete() -> FlaskClient:
    return _client("delete_todo")


@pytest.fixture(autouse=True)
def kafka_backoff_reset() -> Iterator[None]:
    """A test that trips the inline-publish backoff must not make the next test skip its inline publish."""
    relay.kafka_backoff.reset()
    yield
    relay.kafka_backoff.reset()


def create_todo(create: FlaskClient, **fields: Any) -> dict[str, Any]:
    response = create.post("/", json={"title": f"test {uuid.uuid4()}", **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


# --- the write DB -------------------------------------------------------------------------------------


def outbox_rows(todo_ids: list[int]) -> list[Any]:
    with write_engine().connect() as conn:
        return conn.execute(
            sa.select(outbox).where(outbox.c.todo_id.in_(todo_ids)).order_by(outbox.c.id)
        ).all()


def changes_of(todo_ids: list[int]) -> list[Any]:
    """The outbox rows without published_at: what commands wrote (publishing happens in the background)."""
    columns = [column for column in outbox.c if column.name != "published_at"]
    with write_engine().connect() as conn:
        return conn.execute(
            sa.select(*columns).where(outbox.c.todo_id.in_(todo_ids)).order_by(outbox.c.id)
        ).all()


def todo_row(todo_id: int) -> Any:
    with write_engine().connect() as conn:
        return conn.execute(sa.select(todos).where(todos.c.id == todo_id)).first()


def publish_pending() -> None:
    """Publish whatever is still pending, with the real producer (the inline publish is best effort)."""
    relay.drain_outbox(lock_wait_s=RELAY_LOCK_WAIT_S, get_publisher=publisher_module.publisher)


# --- the topic ----------------------------------------------------------------------------------------


def _consumer() -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings().kafka_bootstrap_servers,
            "group.id": f"test-command-side-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )


def topic_end_offsets() -> dict[int, int]:
    """Each partition's high watermark now: the records a test causes come after it."""
    s, consumer = settings(), _consumer()
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(s.topic, p), timeout=KAFKA_TIMEOUT_S)[1]
            for p in range(s.topic_partitions)
        }
    finally:
        consumer.close()


def records_since(start: dict[int, int], todo_ids: list[int]) -> list[Message]:
    """Every record keyed by one of todo_ids from `start` up to the current end, in partition order."""
    s, consumer = settings(), _consumer()
    keys = {str(todo_id).encode() for todo_id in todo_ids}
    found: list[Message] = []
    try:
        consumer.assign([TopicPartition(s.topic, p, offset) for p, offset in start.items()])
        at_end: set[int] = set()
        deadline = time.monotonic() + KAFKA_TIMEOUT_S
        while at_end != set(start):
            assert time.monotonic() < deadline, f"the topic's end not reached in {KAFKA_TIMEOUT_S}s"
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                at_end.add(message.partition())
            elif message.key() in keys:
                found.append(message)
    finally:
        consumer.close()
    return found


def headers_of(message: Message) -> dict[str, str]:
    return {name: value.decode() for name, value in message.headers() or []}


def events_by_todo(messages: list[Message]) -> dict[int, list[tuple[str, int, dict[str, Any]]]]:
    """todo id -> [(ce_type, version, data)] in topic order."""
    events: dict[int, list[tuple[str, int, dict[str, Any]]]] = {}
    for message in messages:
        data = json.loads(message.value())
        events.setdefault(int(message.key()), []).append(
            (headers_of(message)["ce_type"], data["version"], data)
        )
    return events


def assert_published_once_in_order(start: dict[int, int], todo_ids: list[int]) -> list[Message]:
    """Every outbox event of these todos is on the topic exactly once, in version order per todo."""
    rows = outbox_rows(todo_ids)
    assert all(row.published_at is not None for row in rows), "some events are still pending"
    messages = records_since(start, todo_ids)
    ids_on_topic = [headers_of(m)["ce_id"] for m in messages]
    assert len(ids_on_topic) == len(set(ids_on_topic)), "an event was published twice"
    assert sorted(ids_on_topic) == sorted(row.event_id for row in rows)
    for todo_id, events in events_by_todo(messages).items():
        expected = [row.version for row in rows if row.todo_id == todo_id]
        assert [version for _, version, _ in events] == expected == sorted(expected)
    return messages


# --- the record on the topic --------------------------------------------------------------------------


def test_created_event_on_topic_has_the_contract_key_headers_and_data(
    create: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = topic_end_offsets()
    inline_drains: list[int] = []
    real_drain = relay.drain_outbox

    def recording_drain(**kwargs: Any) -> int:
        inline_drains.append(real_drain(**kwargs))
        return inline_drains[-1]

    monkeypatch.setattr(relay, "drain_outbox", recording_drain)
    response = create.post("/todo", json={"title": "buy milk", "description": "two litres"})
    # The command answers after its commit; its process's publisher drains right after.
    relay.outbox_publisher.publish(wait_s=5)
    monkeypatch.undo()
    assert response.status_code == 201
    assert len(inline_drains) >= 1, "the command's process did not publish after its commit"
    todo = response.get_json()
    assert response.headers["Location"] == f"/todo/{todo['id']}"
    assert response.headers["ETag"] == '"1"'
    publish_pending()

    [message] = records_since(start, [todo["id"]])
    headers = headers_of(message)
    [row] = outbox_rows([todo["id"]])
    assert message.key() == str(todo["id"]).encode()
    assert headers["ce_specversion"] == "1.0"
    assert str(uuid.UUID(headers["ce_id"])) == headers["ce_id"] == row.event_id
    assert headers["ce_source"] == settings().event_source
    assert headers["ce_type"] == "todo.created.v1"
    assert headers["ce_subject"] == str(todo["id"])
    assert headers["ce_time"] == todo["updated_at"]
    assert headers["ce_time"].endswith("Z") and datetime.fromisoformat(headers["ce_time"])
    assert headers["content-type"] == "application/json"
    assert json.loads(message.value()) == todo
    assert set(todo) == {"id", "title", "description", "status", "version", "created_at", "updated_at"}
    assert (todo["title"], todo["description"], todo["status"], todo["version"]) == (
        "buy milk", "two litres", "CREATED", 1
    )  # fmt: skip


def test_update_and_delete_events_carry_each_version_once(
    create: FlaskClient, update: FlaskClient, delete: FlaskClient
) -> None:
    start = topic_end_offsets()
    created = create_todo(create)
    todo_id = created["id"]
    renamed = update.patch(f"/{todo_id}", json={"title": "renamed"})
    started = update.patch(f"/todo/{todo_id}", json={"status": "IN_PROGRESS"})
    deleted = delete.delete(f"/{todo_id}")
    assert [r.status_code for r in (renamed, started, deleted)] == [200, 200, 200]
    assert [r.headers["ETag"] for r in (renamed, started)] == ['"2"', '"3"']
    assert deleted.get_json() == started.get_json()  # the todo as it was before deletion
    publish_pending()

    messages = assert_published_once_in_order(start, [todo_id])
    events = events_by_todo(messages)[todo_id]
    assert [(type_, version) for type_, version, _ in events] == [
        ("todo.created.v1", 1), ("todo.updated.v1", 2), ("todo.updated.v1", 3), ("todo.deleted.v1", 4)
    ]  # fmt: skip
    assert [data for _, _, data in events[:3]] == [created, renamed.get_json(), started.get_json()]
    assert {"id": todo_id, "version": 4}.items() <= events[3][2].items()
    assert all(headers_of(m)["ce_subject"] == str(todo_id) for m in messages)
    assert todo_row(todo_id) is None


def test_deleted_todo_is_gone_for_later_updates_and_deletes(
    create: FlaskClient, update: FlaskClient, delete: FlaskClient
) -> None:
    todo_id = create_todo(create)["id"]
    assert delete.delete(f"/{todo_id}").status_code == 200
    events_after_delete = changes_of([todo_id])

    late_update = update.patch(f"/{todo_id}", json={"title": "too late"})
    second_delete = delete.delete(f"/{todo_id}")

    assert (late_update.status_code, second_delete.status_code) == (404, 404)
    assert late_update.get_json()["error"]["code"] == second_delete.get_json()["error"]["code"] == "not_found"
    assert changes_of([todo_id]) == events_after_delete
    assert [row.version for row in events_after_delete] == [1, 2]


def test_if_match_mismatch_changes_nothing(
    create: FlaskClient, update: FlaskClient, delete: FlaskClient
) -> None:
    todo_id = create_todo(create)["id"]
    row_before, events_before = todo_row(todo_id), changes_of([todo_id])

    stale_update = update.patch(f"/{todo_id}", json={"title": "mine"}, headers={"If-Match": '"7"'})
    stale_delete = delete.delete(f"/{todo_id}", headers={"If-Match": '"2"'})

    assert (stale_update.status_code, stale_delete.status_code) == (412, 412)
    assert stale_update.get_json()["error"]["code"] == "version_mismatch"
    assert todo_row(todo_id) == row_before
    assert changes_of([todo_id]) == events_before
    # The same requests with the current version do apply: the mismatch was the only reason to refuse.
    matching = update.patch(f"/{todo_id}", json={"title": "mine"}, headers={"If-Match": '"1"'})
    assert (matching.status_code, matching.get_json()["version"]) == (200, 2)
    assert delete.delete(f"/{todo_id}", headers={"If-Match": '"2"'}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [{"title": "   "}, {"title": "x" * 256}, {"title": "ok", "colour": "red"}, {"title": 7}, {}],
    ids=["blank-title", "title-too-long", "unknown-field", "title-not-a-string", "no-title"],
)
def test_rejected_create_writes_nothing(create: FlaskClient, body: dict[str, Any]) -> None:
    marker = f"rejected {uuid.uuid4()}"
    response = create.post("/", json={**body, "description": marker})
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_failed"
    with write_engine().connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(todos.c.description == marker)).scalar() == 0
        pattern = f"%{marker}%"
        assert conn.execute(sa.select(sa.func.count()).where(outbox.c.payload.like(pattern))).scalar() == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"status": "DONE"}, 422),
        ({"title": "ok", "owner": "me"}, 422),
        ({"description": 1}, 422),
        (b"{not json", 400),
        (b"[1, 2]", 400),
    ],
    ids=["empty", "unknown-status", "unknown-field", "description-not-a-string", "not-json", "not-an-object"],
)
def test_rejected_update_writes_nothing(
    create: FlaskClient, update: FlaskClient, body: dict[str, Any] | bytes, status: int
) -> None:
    todo_id = create_todo(create)["id"]
    row_before, events_before = todo_row(todo_id), changes_of([todo_id])
    if isinstance(body, bytes):
        response = update.patch(f"/{todo_id}", data=body, headers=JSON)
    else:
        response = update.patch(f"/{todo_id}", json=body)
    assert response.status_code == status
    assert todo_row(todo_id) == row_before
    assert changes_of([todo_id]) == events_before


def test_update_that_changes_nothing_keeps_the_version_and_emits_no_event(
    create: FlaskClient, update: FlaskClient
) -> None:
    todo = create_todo(create, description="same")
    response = update.patch(f"/{todo['id']}", json={"title": todo["title"], "description": "same"})
    assert (response.status_code, response.get_json()) == (200, todo)
    assert [row.version for row in outbox_rows([todo["id"]])] == [1]


# --- Kafka down ---------------------------------------------------------------------------------------


class KafkaOutage:
    """This process's producer pointed at a closed port, recording every publish it attempts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.attempts: list[tuple[list[int], list[int]]] = []  # (outbox ids asked, outbox ids delivered)
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", CLOSED_PORT)
        self._reset_clients()
        dead = publisher_module.publisher()
        real_publish = dead.publish

        def recording_publish(records: Any, timeout_s: float) -> list[int]:
            delivered = real_publish(records, timeout_s)
            self.attempts.append(([r.outbox_id for r in records], delivered))
            return delivered

        monkeypatch.setattr(dead, "publish", recording_publish)
        self._dead = dead

    @staticmethod
    def _reset_clients() -> None:
        settings.cache_clear()
        publisher_module.reset_publisher()
        relay.kafka_backoff.reset()

    def end(self) -> None:
        """Kafka is back: the real settings and a producer for the real broker."""
        self._monkeypatch.undo()
        self._reset_clients()  # closes the dead producer too, which stops its reconnect loop


def _pending_under_relay_lock(todo_ids: list[int]) -> list[Any]:
    """The outbox rows, read while holding the relay's lock, so no drain runs during the read."""
    with write_engine().connect() as conn:
        assert conn.execute(sa.text("SELECT GET_LOCK(:n, :w)"), {"n": relay.LOCK_NAME, "w": 10}).scalar() == 1
        try:
            return conn.execute(
                sa.select(outbox).where(outbox.c.todo_id.in_(todo_ids)).order_by(outbox.c.id)
            ).all()
        finally:
            conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": relay.LOCK_NAME})


def test_commands_succeed_while_kafka_is_down_and_the_relay_publishes_later(
    create: FlaskClient, update: FlaskClient, delete: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = topic_end_offsets()
    before = create_todo(create)  # published normally: only its later events meet the outage
    publish_pending()
    published_before = {row.id for row in outbox_rows([before["id"]])}

    outage = KafkaOutage(monkeypatch)
    try:
        created = create.post("/", json={"title": "during the outage"})
        updated = update.patch(f"/{created.get_json()['id']}", json={"status": "FINISHED"})
        also_updated = update.patch(f"/{before['id']}", json={"title": "changed during the outage"})
        deleted = delete.delete(f"/{before['id']}")
        assert [r.status_code for r in (created, updated, also_updated, deleted)] == [201, 200, 200, 200]
        relay.outbox_publisher.publish(wait_s=5)  # let this process's publisher try the dead broker
        todo_ids = [before["id"], created.get_json()["id"]]

        # Read under the relay lock so no drain runs meanwhile. A relay in another process sharing these
        # databases could still publish the rows just before: a false failure, possible only there.
        rows = _pending_under_relay_lock(todo_ids)
        outage_rows = [row for row in rows if row.id not in published_before]
        assert [(row.todo_id, row.version) for row in outage_rows] == [
            (todo_ids[1], 1), (todo_ids[1], 2), (before["id"], 2), (before["id"], 3)
        ]  # fmt: skip
        # The inline publish tried the dead broker, got no acknowledgement, and so left the rows pending.
        assert outage.attempts, "no command tried to publish"
        assert outage_rows[0].id in outage.attempts[0][0]
        assert all(delivered == [] for _, delivered in outage.attempts)
        assert all(row.published_at is None for row in outage_rows), "marked published while Kafka was down"
    finally:
        outage.end()

    publish_pending()
    publish_pending()  # a second drain finds nothing of ours to publish again
    assert_published_once_in_order(start, todo_ids)


# --- concurrency --------------------------------------------------------------------------------------


def test_parallel_patches_of_one_todo_get_distinct_consecutive_versions(
    create: FlaskClient, update: FlaskClient
) -> None:
    start = topic_end_offsets()
    todo_id = create_todo(create)["id"]
    count = 20
    barrier = threading.Barrier(count)
    answers: dict[int, Any] = {}

    def patch(n: int) -> None:
        client = update.application.test_client()
        barrier.wait(timeout=10)
        answers[n] = client.patch(f"/{todo_id}", json={"title": f"writer {n}"})

    threads = [threading.Thread(target=patch, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(r.status_code for r in answers.values()) == [200] * count, [
        r.get_json() for r in answers.values() if r.status_code != 200
    ]
    assert sorted(r.get_json()["version"] for r in answers.values()) == list(range(2, count + 2))
    assert todo_row(todo_id).version == count + 1
    publish_pending()

    rows = [row for row in outbox_rows([todo_id]) if row.event_type == "todo.updated.v1"]
    assert [row.version for row in rows] == list(range(2, count + 2))  # in outbox-id order
    assert len({row.event_id for row in rows}) == count
    titles = [json.loads(row.payload)["title"] for row in rows]
    assert sorted(titles) == sorted(f"writer {n}" for n in range(count))
    # Each event is the todo its own request answered.
    answered = {r.get_json()["version"]: r.get_json() for r in answers.values()}
    assert all(json.loads(row.payload) == answered[row.version] for row in rows)

    messages = assert_published_once_in_order(start, [todo_id])
    assert [version for _, version, _ in events_by_todo(messages)[todo_id]] == list(range(1, count + 2))
