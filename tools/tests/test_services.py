"""The local services answer the way the app uses them: both databases, Redis, the events topic."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
import redis
import sqlalchemy as sa
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from sqlalchemy.engine import Engine

from todo_cqrs.settings import settings
from tools import services
from tools.sync_db import read_db, write_db

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def running_services() -> dict[str, int | None]:
    return services.ensure_services()


@pytest.mark.parametrize(
    ("engine", "database_setting"),
    [(write_db, "write_db_url"), (read_db, "read_db_url")],
    ids=["write", "read"],
)
def test_database_round_trips_a_utf8mb4_row(engine: Callable[[], Engine], database_setting: str) -> None:
    expected_database = sa.engine.make_url(getattr(settings(), database_setting)).database
    note = f"probe {uuid.uuid4()} ✓ 🚀"  # a 4-byte character fails under a 3-byte utf8 charset
    settings_query = sa.text("SELECT DATABASE(), @@character_set_database, @@collation_database")
    with engine().connect() as conn:
        database, charset, collation = conn.execute(settings_query).one()
        conn.execute(sa.text("CREATE TEMPORARY TABLE services_probe (id INT PRIMARY KEY, note VARCHAR(100))"))
        conn.execute(sa.text("INSERT INTO services_probe VALUES (1, :note)"), {"note": note})
        stored = conn.execute(sa.text("SELECT note FROM services_probe WHERE id = 1")).scalar_one()
    assert (database, charset, collation) == (expected_database, "utf8mb4", "utf8mb4_unicode_ci")
    assert stored == note


def test_redis_round_trips_a_value() -> None:
    client = redis.Redis.from_url(settings().redis_url, socket_timeout=2)
    key, value = f"test-services:{uuid.uuid4()}", uuid.uuid4().hex
    try:
        assert client.set(key, value, ex=60)
        assert client.get(key) == value.encode()
    finally:
        client.delete(key)
        client.close()


def test_events_topic_has_the_configured_partitions() -> None:
    s = settings()
    topic = AdminClient({"bootstrap.servers": s.kafka_bootstrap_servers}).list_topics(s.topic, timeout=10)
    assert len(topic.topics[s.topic].partitions) == s.topic_partitions


def test_record_produced_on_events_topic_is_consumed() -> None:
    s = settings()
    key, value = f"test-services-{uuid.uuid4()}".encode(), uuid.uuid4().bytes
    delivered: list[Message] = []
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap_servers, "acks": "all"})
    producer.produce(s.topic, key=key, value=value, on_delivery=lambda err, msg: delivered.append(msg))
    assert producer.flush(15) == 0, "the record was not delivered within 15 s"
    assert delivered[0].error() is None, delivered[0].error()
    partition, offset = delivered[0].partition(), delivered[0].offset()
    assert partition is not None and offset is not None

    consumer = Consumer(
        {
            "bootstrap.servers": s.kafka_bootstrap_servers,
            "group.id": f"test-services-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(s.topic, partition, offset)])
        deadline = time.monotonic() + 15
        received = None
        while received is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received = msg
    finally:
        consumer.close()
    assert received is not None, "the produced record was not consumed within 15 s"
    assert (received.key(), received.value()) == (key, value)


def test_ensure_services_reuses_the_running_processes(
    running_services: dict[str, int | None], capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    again = services.ensure_services()
    progress = capfd.readouterr().err
    assert again == running_services
    running = {entry.name: entry.pid for entry in services.status() if entry.state == "running"}
    assert running == {name: pid for name, pid in again.items() if pid is not None}
    # Nothing started, set up or fetched again: no process, data folder, topic or jar is new.
    for change in (": started pid", "initialising", "formatting", "created topic", "fetching"):
        assert change not in progress, progress


def test_paused_redis_times_out_and_answers_after_resume() -> None:
    client = redis.Redis.from_url(settings().redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    services.pause("redis")
    try:
        assert [entry.state for entry in services.status() if entry.name == "redis"] == ["paused"]
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
    finally:
        services.resume("redis")
    client.connection_pool.disconnect()  # the timed-out connection still holds the unread PONG
    assert client.ping()
    client.close()


def test_stop_services_stops_only_the_named_services(running_services: dict[str, int | None]) -> None:
    services.stop_services(["redis"])
    try:
        assert "redis" not in services.running_services()
        still_running = {entry.name: entry.pid for entry in services.status() if entry.state == "running"}
        assert still_running == {n: p for n, p in running_services.items() if n != "redis" and p is not None}
    finally:
        restarted = services.ensure_services()
    assert restarted["redis"] not in (None, running_services["redis"])
    running_services.update(restarted)
