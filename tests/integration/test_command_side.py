"""The command side on the real write DB and Kafka: what the functions commit and what lands on the topic.

Every test creates its own todos and reads the topic from offsets noted before acting, keeping only the
records keyed by its own ids, so it shares the databases and the topic with anyone else safely.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from tests.integration.databases import write_db
from tests.integration.in_process import deps_of, running_with
from tests.integration.settings_override import Run
from todo_cqrs import bootstrap
from todo_cqrs.adapters.publisher import DIRECT_WINDOW_S, Kafka, Publisher
from todo_cqrs.adapters.write_store import MariaDbUnitOfWork, WriteStore, outbox, todos
from todo_cqrs.command import handlers
from todo_cqrs.command.handlers import Commands
from todo_cqrs.db import Database
from todo_cqrs.loop_local import close_loop_resources
from todo_cqrs.outbox.leases import outbox_database
from todo_cqrs.outbox.publisher import ProcessPublisher
from todo_cqrs.outbox.relay import LEASE_MARGIN_S, Relay, relay_once
from todo_cqrs.settings import Settings, settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

CLOSED_PORT = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
KAFKA_TIMEOUT_S = 20.0
PUBLISHED_WITHIN_S = 10.0
JSON = {"Content-Type": "application/json"}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# --- the functions' apps ------------------------------------------------------------------------------


def create_todo(create: TestClient, **fields: Any) -> dict[str, Any]:
    response = create.post("/", json={"title": f"test {uuid.uuid4()}", **fields})
    assert response.status_code == 201, response.json()
    return response.json()


# --- the write DB -------------------------------------------------------------------------------------


async def outbox_rows(todo_ids: list[int]) -> list[Any]:
    async with write_db().engine.connect() as conn:
        result = await conn.execute(
            sa.select(outbox).where(outbox.c.todo_id.in_(todo_ids)).order_by(outbox.c.id)
        )
        return list(result.all())


async def changes_of(todo_ids: list[int]) -> list[Any]:
    """The outbox rows without published_at: what commands wrote (publishing happens in the background)."""
    columns = [column for column in outbox.c if column.name != "published_at"]
    async with write_db().engine.connect() as conn:
        result = await conn.execute(
            sa.select(*columns).where(outbox.c.todo_id.in_(todo_ids)).order_by(outbox.c.id)
        )
        return list(result.all())


async def todo_row(todo_id: int) -> Any:
    async with write_db().engine.connect() as conn:
        return (await conn.execute(sa.select(todos).where(todos.c.id == todo_id))).first()


async def database_now() -> datetime:
    async with write_db().engine.connect() as conn:
        now = (await conn.execute(sa.text("SELECT UTC_TIMESTAMP(3)"))).scalar_one()
    return now.replace(tzinfo=UTC)


async def wait_until_published(todo_ids: list[int], timeout_s: float = PUBLISHED_WITHIN_S) -> None:
    """Until every outbox row of these todos is marked published (by whoever drains its shard)."""
    deadline = time.monotonic() + timeout_s
    while not all(row.published_at is not None for row in await outbox_rows(todo_ids)):
        assert time.monotonic() < deadline, f"events of {todo_ids} still pending after {timeout_s} s"
        await asyncio.sleep(0.02)


def published_by_this_process() -> float:
    """The outbox rows this test process's publishers have put on Kafka so far (its metric)."""
    return REGISTRY.get_sample_value("todo_outbox_published_total") or 0.0


def publish_pending(run: Run[Any]) -> None:
    """Publish whatever is still pending, as `make relay-once` does (waiting out a lease held elsewhere)."""
    run(relay_once(settings(), 0.0, wait_s=settings().outbox_lease_s + LEASE_MARGIN_S))


async def pending_rows() -> int:
    async with write_db().engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
        return int((await conn.execute(query)).scalar_one())


def publisher_state(function: TestClient) -> str:
    async def state() -> str:
        return repr(deps_of(function).publisher.in_this_loop())

    return str(function.portal.call(state))


def publisher_busy(function: TestClient) -> bool:
    """Whether the in-process function's outbox publisher still holds rows (asked in its own loop)."""

    async def busy() -> bool:
        outbox = deps_of(function).publisher.in_this_loop()
        return outbox is not None and outbox.busy

    return bool(function.portal.call(busy))


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


def assert_published_once_in_order(
    run: Run[Any], start: dict[int, int], todo_ids: list[int]
) -> list[Message]:
    """Every outbox event of these todos is on the topic exactly once, in version order per todo."""
    rows = run(outbox_rows(todo_ids))
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
    run: Run[Any], create: TestClient
) -> None:
    start, before = topic_end_offsets(), run(database_now())
    published_here = published_by_this_process()
    response = create.post(
        "/todo", json={"title": "buy milk", "description": "two litres"}, headers={"traceparent": TRACEPARENT}
    )
    after = run(database_now())
    assert response.status_code == 201
    todo = response.json()
    assert response.headers["Location"] == f"/todo/{todo['id']}"
    assert response.headers["ETag"] == '"1"'
    # The command answers after its commit; its process's publisher drains right after, unasked.
    run(wait_until_published([todo["id"]]))
    assert published_by_this_process() > published_here, "published, but not by the command's process"

    [message] = records_since(start, [todo["id"]])
    headers = headers_of(message)
    [row] = run(outbox_rows([todo["id"]]))
    assert message.key() == str(todo["id"]).encode()
    assert headers["ce_specversion"] == "1.0"
    assert str(uuid.UUID(headers["ce_id"])) == headers["ce_id"] == row.event_id
    assert headers["ce_source"] == settings().event_source
    assert headers["ce_type"] == "todo.created.v1"
    assert headers["ce_subject"] == str(todo["id"])
    assert headers["ce_time"] == todo["updated_at"] == todo["created_at"]
    assert headers["ce_time"].endswith("Z")
    # Stamped by the write database's clock, inside the command's transaction.
    assert before <= datetime.fromisoformat(headers["ce_time"]) <= after
    assert headers["content-type"] == "application/json"
    # The command's trace goes on with its event (distributed-tracing extension), under the same trace id.
    assert headers["ce_traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]
    assert headers["ce_traceparent"] != TRACEPARENT  # the command's own span, a child of the caller's
    assert json.loads(message.value()) == todo
    assert set(todo) == {"id", "title", "description", "status", "version", "created_at", "updated_at"}
    assert (todo["title"], todo["description"], todo["status"], todo["version"]) == (
        "buy milk", "two litres", "CREATED", 1
    )  # fmt: skip


def test_update_and_delete_events_carry_each_version_once(
    run: Run[Any], create: TestClient, update: TestClient, delete: TestClient
) -> None:
    start = topic_end_offsets()
    created = create_todo(create)
    todo_id = created["id"]
    renamed = update.patch(f"/{todo_id}", json={"title": "renamed"})
    started = update.patch(f"/todo/{todo_id}", json={"status": "IN_PROGRESS"})
    deleted = delete.delete(f"/{todo_id}")
    assert [r.status_code for r in (renamed, started, deleted)] == [200, 200, 200]
    assert [r.headers["ETag"] for r in (renamed, started)] == ['"2"', '"3"']
    assert deleted.json() == started.json()  # the todo as it was before deletion
    run(wait_until_published([todo_id]))

    messages = assert_published_once_in_order(run, start, [todo_id])
    events = events_by_todo(messages)[todo_id]
    assert [(type_, version) for type_, version, _ in events] == [
        ("todo.created.v1", 1), ("todo.updated.v1", 2), ("todo.updated.v1", 3), ("todo.deleted.v1", 4)
    ]  # fmt: skip
    assert [data for _, _, data in events[:3]] == [created, renamed.json(), started.json()]
    assert {"id": todo_id, "version": 4}.items() <= events[3][2].items()
    assert all(headers_of(m)["ce_subject"] == str(todo_id) for m in messages)
    assert run(todo_row(todo_id)) is None


def test_deleted_todo_is_gone_for_later_updates_and_deletes(
    run: Run[Any], create: TestClient, update: TestClient, delete: TestClient
) -> None:
    todo_id = create_todo(create)["id"]
    assert delete.delete(f"/{todo_id}").status_code == 200
    events_after_delete = run(changes_of([todo_id]))

    late_update = update.patch(f"/{todo_id}", json={"title": "too late"})
    second_delete = delete.delete(f"/{todo_id}")

    assert (late_update.status_code, second_delete.status_code) == (404, 404)
    assert late_update.json()["error"]["code"] == second_delete.json()["error"]["code"] == "not_found"
    assert run(changes_of([todo_id])) == events_after_delete
    assert [row.version for row in events_after_delete] == [1, 2]


def test_if_match_mismatch_changes_nothing(
    run: Run[Any], create: TestClient, update: TestClient, delete: TestClient
) -> None:
    todo_id = create_todo(create)["id"]
    row_before, events_before = run(todo_row(todo_id)), run(changes_of([todo_id]))

    stale_update = update.patch(f"/{todo_id}", json={"title": "mine"}, headers={"If-Match": '"7"'})
    stale_delete = delete.delete(f"/{todo_id}", headers={"If-Match": '"2"'})

    assert (stale_update.status_code, stale_delete.status_code) == (412, 412)
    assert stale_update.json()["error"]["code"] == "version_mismatch"
    assert run(todo_row(todo_id)) == row_before
    assert run(changes_of([todo_id])) == events_before
    # The same requests with the current version do apply: the mismatch was the only reason to refuse.
    matching = update.patch(f"/{todo_id}", json={"title": "mine"}, headers={"If-Match": '"1"'})
    assert (matching.status_code, matching.json()["version"]) == (200, 2)
    assert delete.delete(f"/{todo_id}", headers={"If-Match": '"2"'}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [{"title": "   "}, {"title": "x" * 256}, {"title": "ok", "colour": "red"}, {"title": 7}, {}],
    ids=["blank-title", "title-too-long", "unknown-field", "title-not-a-string", "no-title"],
)
def test_rejected_create_writes_nothing(run: Run[Any], create: TestClient, body: dict[str, Any]) -> None:
    marker = f"rejected {uuid.uuid4()}"
    response = create.post("/", json={**body, "description": marker})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_failed"
    assert run(rows_mentioning(marker)) == (0, 0)


async def rows_mentioning(marker: str) -> tuple[int, int]:
    """(todos, outbox rows) whose description or payload holds the marker."""
    async with write_db().engine.connect() as conn:
        in_todos = await conn.execute(sa.select(sa.func.count()).where(todos.c.description == marker))
        in_outbox = await conn.execute(sa.select(sa.func.count()).where(outbox.c.payload.like(f"%{marker}%")))
        return in_todos.scalar_one(), in_outbox.scalar_one()


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
    run: Run[Any], create: TestClient, update: TestClient, body: dict[str, Any] | bytes, status: int
) -> None:
    todo_id = create_todo(create)["id"]
    row_before, events_before = run(todo_row(todo_id)), run(changes_of([todo_id]))
    if isinstance(body, bytes):
        response = update.patch(f"/{todo_id}", content=body, headers=JSON)
    else:
        response = update.patch(f"/{todo_id}", json=body)
    assert response.status_code == status
    assert run(todo_row(todo_id)) == row_before
    assert run(changes_of([todo_id])) == events_before


def test_update_that_changes_nothing_keeps_the_version_and_emits_no_event(
    run: Run[Any], create: TestClient, update: TestClient
) -> None:
    todo = create_todo(create, description="same")
    response = update.patch(f"/{todo['id']}", json={"title": todo["title"], "description": "same"})
    assert (response.status_code, response.json()) == (200, todo)
    assert [row.version for row in run(outbox_rows([todo["id"]]))] == [1]


class _FailingAfterTheOutboxInsert(WriteStore):
    """The MariaDB store, whose units of work fail right after their events went into the outbox (the
    deferred INSERT goes to the server with the next statement, a lock of the todo)."""

    async def run(self, work: Any, trace: Any) -> Any:
        async def fail_after(uow: MariaDbUnitOfWork) -> Any:
            result = await work(uow)
            uow.append_events(trace)
            assert await uow.lock(result.todo.id) is not None
            raise RuntimeError("the transaction fails after the outbox insert")

        return await super().run(fail_after, trace)


def test_change_rolled_back_after_its_event_was_written_leaves_neither(run: Run[Any]) -> None:
    marker = f"rolled back {uuid.uuid4()}"
    s = settings()
    real = bootstrap.commands(s)
    store = _FailingAfterTheOutboxInsert(Database.write(s), s.outbox_shards, s.idempotency_ttl_s)
    with running_with("create_todo", Commands(store, real.publisher)) as create:
        response = create.post("/", json={"title": "doomed", "description": marker})

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal"
    assert run(rows_mentioning(marker)) == (0, 0)


# --- Kafka down ---------------------------------------------------------------------------------------


class RecordingKafka(Kafka):
    """The producer of the given settings, recording every publish it attempts; the first
    `unacknowledged` batches go unacknowledged, as a producer still connecting (a new process's first
    event) does when its acks are late."""

    def __init__(self, s: Settings, unacknowledged: int = 0) -> None:
        super().__init__(s)
        self.unacknowledged = unacknowledged
        self.attempts: list[tuple[list[int], list[int]]] = []  # (outbox ids asked, outbox ids delivered)

    def __call__(self) -> Publisher:
        producer = super().__call__()
        kafka = self

        class Recording:
            def publish(self, records: Any, timeout_s: float) -> list[int]:
                late = len(kafka.attempts) < kafka.unacknowledged
                delivered = [] if late else producer.publish(records, timeout_s)
                kafka.attempts.append(([r.outbox_id for r in records], delivered))
                return delivered

        return Recording()  # type: ignore[return-value]

    def attempted(self) -> set[int]:
        return {outbox_id for asked, _ in list(self.attempts) for outbox_id in asked}


def test_a_batch_kafka_did_not_acknowledge_is_sent_again_by_its_process_not_left_to_the_relay(
    run: Run[Any],
) -> None:
    s = settings()
    kafka = RecordingKafka(s, unacknowledged=1)
    deps = Commands(
        bootstrap.commands(s).store, ProcessPublisher(kafka, outbox_database(s), s.publish_timeout_s)
    )
    start = topic_end_offsets()
    with running_with("create_todo", deps) as create:
        todo = create_todo(create)
        # Well before the relay would take it as an orphan (OUTBOX_ORPHAN_SECONDS).
        run(wait_until_published([todo["id"]], timeout_s=DIRECT_WINDOW_S + 2))
    assert len(kafka.attempts) >= 2
    assert_published_once_in_order(run, start, [todo["id"]])


def test_commands_succeed_while_kafka_is_down_and_the_relay_publishes_later(
    run: Run[Any], create: TestClient
) -> None:
    start = topic_end_offsets()
    before = create_todo(create)  # published normally: only its later events meet the outage
    run(wait_until_published([before["id"]]))
    published_before = {row.id for row in run(outbox_rows([before["id"]]))}

    # The command functions of one process whose producer is pointed at a closed port.
    s = dataclasses.replace(settings(), kafka_bootstrap_servers=CLOSED_PORT)
    outage = RecordingKafka(s)
    publisher = ProcessPublisher(outage, outbox_database(s), s.publish_timeout_s)
    deps = Commands(bootstrap.commands(s).store, publisher)
    with (
        running_with("create_todo", deps) as create,
        running_with("update_todo", deps) as update,
        running_with("delete_todo", deps) as delete,
    ):
        created = create.post("/", json={"title": "during the outage"})
        updated = update.patch(f"/{created.json()['id']}", json={"status": "FINISHED"})
        also_updated = update.patch(f"/{before['id']}", json={"title": "changed during the outage"})
        deleted = delete.delete(f"/{before['id']}")
        assert [r.status_code for r in (created, updated, also_updated, deleted)] == [201, 200, 200, 200]
        todo_ids = [before["id"], created.json()["id"]]
        outage_ids = {row.id for row in run(outbox_rows(todo_ids))} - published_before

        # The processes' publishers try the dead broker on their own, then leave the rows to the relay.
        deadline = time.monotonic() + 2 * settings().publish_timeout_s + DIRECT_WINDOW_S + 5
        while not outage.attempted() or any(publisher_busy(f) for f in (create, update, delete)):
            states = [publisher_state(f) for f in (create, update, delete)]
            assert time.monotonic() < deadline, f"the publishers still hold rows: {outage.attempts} {states}"
            time.sleep(0.05)

        rows = run(outbox_rows(todo_ids))
        outage_rows = [row for row in rows if row.id not in published_before]
        assert [(row.todo_id, row.version) for row in outage_rows] == [
            (todo_ids[1], 1), (todo_ids[1], 2), (before["id"], 2), (before["id"], 3)
        ]  # fmt: skip
        assert outage_rows[0].id in outage.attempts[0][0]
        # No try got an acknowledgement, and so every row is left pending.
        assert all(delivered == [] for _, delivered in outage.attempts)
        assert all(row.published_at is None for row in outage_rows), "marked published while Kafka was down"
        assert outage.attempted() <= outage_ids
    outage.close()

    publish_pending(run)
    publish_pending(run)  # a second drain finds nothing of ours to publish again
    assert_published_once_in_order(run, start, todo_ids)


# --- concurrency --------------------------------------------------------------------------------------


def test_parallel_patches_of_one_todo_get_distinct_consecutive_versions(
    run: Run[Any], create: TestClient, update: TestClient
) -> None:
    start = topic_end_offsets()
    todo_id = create_todo(create)["id"]
    count = 20
    barrier = threading.Barrier(count)
    answers: dict[int, httpx.Response] = {}

    def patch(n: int) -> None:
        barrier.wait(timeout=10)
        answers[n] = update.patch(f"/{todo_id}", json={"title": f"writer {n}"})

    threads = [threading.Thread(target=patch, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(r.status_code for r in answers.values()) == [200] * count, [
        r.json() for r in answers.values() if r.status_code != 200
    ]
    assert sorted(r.json()["version"] for r in answers.values()) == list(range(2, count + 2))
    assert run(todo_row(todo_id)).version == count + 1
    run(wait_until_published([todo_id]))

    rows = [row for row in run(outbox_rows([todo_id])) if row.event_type == "todo.updated.v1"]
    assert [row.version for row in rows] == list(range(2, count + 2))  # in outbox-id order
    assert len({row.event_id for row in rows}) == count
    titles = [json.loads(row.payload)["title"] for row in rows]
    assert sorted(titles) == sorted(f"writer {n}" for n in range(count))
    # Each event is the todo its own request answered.
    answered = {r.json()["version"]: r.json() for r in answers.values()}
    assert all(json.loads(row.payload) == answered[row.version] for row in rows)

    messages = assert_published_once_in_order(run, start, [todo_id])
    assert [version for _, version, _ in events_by_todo(messages)[todo_id]] == list(range(1, count + 2))


class _PublisherOfAProcessThatDied:
    """Stands in for the commands' own publisher: as if their process had died right after each commit."""

    def committed(self, record: object, after: int | None) -> None:
        pass

    def warm_up(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_concurrent_drains_in_several_processes_publish_each_event_once_in_version_order(
    run: Run[Any], commands: Commands
) -> None:
    """Relays of four processes (a thread each, with its own event loop, pools and Kafka producer) drain
    while the commands commit, in small batches: the shards' leases change hands all the time."""
    start = topic_end_offsets()
    processes, todo_count, updates = 4, 6, 15
    dying = Commands(commands.store, _PublisherOfAProcessThatDied())
    s = dataclasses.replace(settings(), relay_batch_size=4)
    # Each simulated process has its own event loop (and so its own pools) and its own Kafka producer,
    # made and connected when the process starts, as a function's warm_up() does at its cold start.
    producers = threading.local()
    started = threading.Barrier(processes + 1, timeout=30)
    writing_done = threading.Event()
    failures: list[BaseException] = []

    async def drain_until_nothing_is_left() -> None:
        """A relay's loop: drain every shard whose lease is free, until the writes ended and nothing is
        pending."""
        deadline = time.monotonic() + 60
        relay = Relay(outbox_database(s), lambda: producers.current, s, min_age_s=0.0)
        try:
            while time.monotonic() < deadline:
                writes_ended = writing_done.is_set()
                await relay.drain_all(wait_s=0.05)
                if writes_ended and not await pending_rows():
                    return
                await asyncio.sleep(0.002)
        finally:
            await relay.aclose()
            await close_loop_resources()

    def process() -> None:
        producers.current = Publisher(s)
        try:
            producers.current._producer.list_topics(s.topic, timeout=10)  # connected to the broker
            started.wait()
            asyncio.run(drain_until_nothing_is_left())
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)
        finally:
            producers.current.close()

    async def write_changes() -> list[int]:
        replies = await asyncio.gather(
            *(handlers.create_todo(dying, {"title": f"drained {n}"}) for n in range(todo_count))
        )
        todo_ids = [result.todo.id for result in replies]
        for round_ in range(updates):  # one todo's changes one after another, the todos' side by side
            await asyncio.gather(
                *(handlers.update_todo(dying, i, {"title": f"round {round_}"}, None) for i in todo_ids)
            )
        return todo_ids

    threads = [threading.Thread(target=process) for _ in range(processes)]
    for thread in threads:
        thread.start()
    try:
        started.wait()
        todo_ids = run(write_changes())
    finally:
        writing_done.set()
        for thread in threads:
            thread.join(timeout=90)

    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads)
    messages = assert_published_once_in_order(run, start, todo_ids)
    assert len(messages) == todo_count * (1 + updates)
