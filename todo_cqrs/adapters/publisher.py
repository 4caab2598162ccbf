"""Kafka publishing of outbox rows as CloudEvents in binary content mode (one producer per process:
`Producer`).

librdkafka does its network work on its own threads, so its producer is not tied to an event loop;
`publish` blocks until the batch is acknowledged or its time is up, and the relay calls it in a
worker thread (asyncio.to_thread). confluent-kafka's AIOProducer wraps every message in its own
future and batches them again on a thread pool; one call per outbox batch does less.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cloudevents.http import CloudEvent
from cloudevents.kafka import to_binary
from confluent_kafka import KafkaError, Producer

from todo_cqrs.domain.clock import format_time
from todo_cqrs.settings import Settings


@dataclass(frozen=True)
class OutboxRecord:
    """A pending outbox row, as the publisher needs it."""

    outbox_id: int
    event_id: str
    event_type: str
    todo_id: int
    occurred_at: datetime
    payload: str
    traceparent: str | None = None
    tracestate: str | None = None


def to_kafka_message(
    record: OutboxRecord, source: str
) -> tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]:
    """Key, value and headers of the record: key = todo id, so one todo's events share a partition.
    The command's trace context rides along as the distributed-tracing extension (ce_traceparent)."""
    attributes = {
        "id": record.event_id,
        "source": source,
        "type": record.event_type,
        "subject": str(record.todo_id),
        "time": format_time(record.occurred_at),
        "datacontenttype": "application/json",
    }
    if record.traceparent:
        attributes["traceparent"] = record.traceparent
        if record.tracestate:
            attributes["tracestate"] = record.tracestate
    event = CloudEvent(attributes, record.payload.encode())
    message = to_binary(event, data_marshaller=lambda data: data, key_mapper=lambda _: str(record.todo_id))
    key = message.key.encode() if isinstance(message.key, str) else message.key
    value = message.value.encode() if isinstance(message.value, str) else message.value
    assert key is not None
    return key, value, list(message.headers.items())


# How long after its commit a process still publishes its own outbox row (todo_cqrs/outbox/publisher.py).
DIRECT_WINDOW_S = 3.0


def message_timeout_ms(orphan_s: float, transaction_s: float) -> int:
    """A row is handed to Kafka at most DIRECT_WINDOW_S after a commit that took at most a transaction's
    deadline, and becomes the relay's OUTBOX_ORPHAN_SECONDS after it was written: a message this
    producer still holds by then must have failed, so that it never reaches the topic after the relay's
    copy (and the newer events behind it)."""
    return max(500, int((orphan_s - DIRECT_WINDOW_S - transaction_s - 0.5) * 1000))


def producer_config(s: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": s.kafka_bootstrap_servers,
        "acks": "all",
        "enable.idempotence": True,
        # Java clients' partitioner, so any Kafka client agrees on which partition holds a todo.
        "partitioner": "murmur2_random",
        "linger.ms": 1,
        "message.timeout.ms": message_timeout_ms(s.outbox_orphan_s, 2 * s.db_timeout_s),
        "socket.connection.setup.timeout.ms": 3000,
        "reconnect.backoff.max.ms": 1000,
        **kafka_security_config(s),
    }


def kafka_security_config(s: Settings) -> dict[str, Any]:
    """The connection's security from the settings: nothing more for PLAINTEXT (local, loopback);
    SASL credentials and the brokers' CA for SASL_SSL (a cluster's SCRAM-SHA-512 listener)."""
    config: dict[str, Any] = {"security.protocol": s.kafka_security_protocol}
    if s.kafka_sasl_mechanism:
        config |= {
            "sasl.mechanism": s.kafka_sasl_mechanism,
            "sasl.username": s.kafka_sasl_username,
            "sasl.password": s.kafka_sasl_password,
        }
    if s.kafka_ssl_ca_file:
        config["ssl.ca.location"] = s.kafka_ssl_ca_file
    return config


class Publisher:
    """Publishes records and says which were acknowledged by Kafka within the wait bound."""

    def __init__(self, s: Settings) -> None:
        self.broken = False  # a fatal error (e.g. of the idempotent producer): only a new producer helps
        self._producer = Producer({**producer_config(s), "error_cb": self._on_error})
        self._topic = s.topic
        self._source = s.event_source
        self._lock = threading.Lock()  # one batch at a time: delivery reports are matched per batch

    def publish(self, records: Sequence[OutboxRecord], timeout_s: float) -> list[int]:
        """Outbox ids delivered (acks=all) within 2 x timeout_s at most; undelivered ones are purged,
        never sent later."""
        delivered: list[int] = []

        def on_delivery(outbox_id: int) -> Callable[[KafkaError | None, Any], None]:
            def report(err: KafkaError | None, _msg: Any) -> None:
                if err is None:
                    delivered.append(outbox_id)
                elif err.fatal():
                    self.broken = True

            return report

        with self._lock:
            for record in records:
                key, value, headers = to_kafka_message(record, self._source)
                self._producer.produce(
                    self._topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=on_delivery(record.outbox_id),
                )
            if self._producer.flush(timeout_s):
                # Kafka did not answer in time. What was never sent is dropped, so it cannot arrive
                # after a later retry; what is in flight may already be written: its report is waited
                # for once more (a row Kafka has is marked, not published twice), then dropped too.
                self._producer.purge(in_queue=True, in_flight=False, blocking=False)
                if self._producer.flush(timeout_s):
                    self._producer.purge(in_queue=True, in_flight=True, blocking=False)
                    self._producer.flush(0)
        return delivered

    def close(self) -> None:
        """Stop the producer's threads and connections (what is queued is dropped: rows stay pending)."""
        self._producer.purge(in_queue=True, in_flight=True, blocking=False)
        self._producer.close()

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.broken = True


class Kafka:
    """The process's publisher, made on first use and again only after a fatal producer error.

    First use is in the process that serves: a gunicorn master imports the function and forks its
    worker, and librdkafka's threads do not survive fork(), so nothing is made at import."""

    def __init__(self, s: Settings) -> None:
        self._settings = s
        self._current: Publisher | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Publisher:
        with self._lock:
            if self._current is None or self._current.broken:
                self._current = Publisher(self._settings)
            return self._current

    def close(self) -> None:
        """Close the publisher (what is queued is dropped: its rows stay pending); the next use makes
        a new one."""
        with self._lock:
            if self._current is not None:
                self._current.close()
            self._current = None
