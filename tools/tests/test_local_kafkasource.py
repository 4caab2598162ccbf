"""The local KafkaSource against the real local Kafka, delivering to recording test sinks.

Each test has its own topic (3 partitions, deleted afterwards) and consumer group, and its own copy of a
KafkaSource manifest pointing at the test sinks, with `ordering: ordered` or
`ordering: unordered` (the project's). Waits are deadlines on observed conditions.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from todo_cqrs.settings import settings
from tools.kafkasource import LocalKafkaSource
from tools.topology import BY_SERVICE, REPO

pytestmark = pytest.mark.integration

PARTITIONS = 3
ORDERINGS = ["ordered", "unordered"]


# --- a sink that records what it receives and answers what the test says ----------------------------


@dataclass(frozen=True)
class Request:
    headers: dict[str, str]  # names lowercased
    body: bytes

    @property
    def ce(self) -> dict[str, str]:
        return {k[3:]: v for k, v in self.headers.items() if k.startswith("ce-")}


# An answer: (status, body) or (status, body, headers); the function may also sleep to be slow.
Answer = Callable[[Request], tuple]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a source stopped, closing its connections
            super().handle_error(request, client_address)


class RecordingSink:
    """An HTTP server that records every request; `requests` may be shared with another address of the
    same sink (each source of a test gets its own, see test_a_source_beside_another_...)."""

    def __init__(self, answer: Answer | None = None, requests: list[Request] | None = None) -> None:
        self.requests: list[Request] = [] if requests is None else requests
        self.answer: Answer = answer or (lambda request: (200, b""))
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the runner reuses connections

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Request({k.lower(): v for k, v in self.headers.items()}, body)
                sink.requests.append(request)
                status, payload, *rest = sink.answer(request)
                self.send_response(status)
                for name, value in (rest[0] if rest else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/"

    def bodies(self) -> list[bytes]:
        return [r.body for r in list(self.requests)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin() -> AdminClient:
    client = AdminClient({"bootstrap.servers": settings().kafka_bootstrap_servers})
    try:
        client.list_topics(timeout=5)
    except Exception as e:
        pytest.fail(f"Kafka at {settings().kafka_bootstrap_servers} is not reachable (make services?): {e}")
    return client


@pytest.fixture
def topic(admin: AdminClient) -> Iterator[str]:
    name = f"test-kafkasource-{uuid.uuid4().hex[:10]}"
    admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])[name].result(10)
    wait_until(lambda: name in admin.list_topics(timeout=5).topics, 10, f"topic {name}")
    yield name
    admin.delete_topics([name])[name].result(10)


@pytest.fixture
def sinks() -> Iterator[Callable[..., RecordingSink]]:
    started: list[RecordingSink] = []

    def make(answer: Answer | None = None, *, address_of: RecordingSink | None = None) -> RecordingSink:
        """A new sink, or with `address_of` another address of that sink (its answers, its requests)."""
        if address_of is not None:
            started.append(RecordingSink(address_of.answer, address_of.requests))
        else:
            started.append(RecordingSink(answer))
        return started[-1]

    yield make
    for sink in started:
        sink.close()


@pytest.fixture
def sources(admin: AdminClient) -> Iterator[Callable[..., LocalKafkaSource]]:
    started: list[LocalKafkaSource] = []

    def start(spec: Path, **kwargs: Any) -> LocalKafkaSource:
        started.append(LocalKafkaSource(spec, **kwargs).start())
        return started[-1]

    yield start
    for source in started:
        source.stop()
    groups = sorted({source.spec.consumer_group for source in started})
    if groups:
        for future in admin.delete_consumer_groups(groups).values():
            future.exception(10)  # best effort: a group left behind only costs a few bytes


def write_spec(
    tmp_path: Path,
    topic: str,
    *,
    sink: str,
    dead_letter: str | None = None,
    retry: int = 3,
    group: str | None = None,
    ordering: str = "ordered",
) -> Path:
    """The project's kafka-source.yaml with this test's topic, group, sinks, ordering and a fast backoff."""
    doc = yaml.safe_load((REPO / "kafka-source.yaml").read_text())
    spec = doc["spec"]
    assert spec["ordering"] == "unordered"  # the project's: the projection applies what arrives together
    spec["ordering"] = ordering
    spec["topics"] = [topic]
    spec["consumerGroup"] = group or f"test-group-{uuid.uuid4().hex[:10]}"
    spec["sink"] = {"uri": sink}
    spec["delivery"] = {"retry": retry, "backoffPolicy": "exponential", "backoffDelay": "PT0.01S"}
    if dead_letter:
        spec["delivery"]["deadLetterSink"] = {"uri": dead_letter}
    path = tmp_path / f"kafka-source-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def produce(topic: str, records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Produces records (kwargs of Producer.produce) in order; returns their (partition, offset).

    Idempotent, so that a retry (a partition's leader not yet elected on a new topic) cannot put a
    partition's records out of the order they were produced in.
    """
    producer = Producer(
        {"bootstrap.servers": settings().kafka_bootstrap_servers, "linger.ms": 0, "enable.idempotence": True}
    )
    positions: list[tuple[int, int]] = [(-1, -1)] * len(records)

    def delivered(index: int) -> Callable:
        def callback(err: Any, msg: Any) -> None:
            assert err is None, err
            positions[index] = (msg.partition(), msg.offset())

        return callback

    for i, record in enumerate(records):
        producer.produce(topic, on_delivery=delivered(i), **record)
    assert producer.flush(10) == 0
    return positions


def produce_numbered(
    topic: str, per_partition: int, partitions: range | tuple[int, ...] = range(PARTITIONS)
) -> None:
    """`per_partition` records on each of the partitions, each {"p": partition, "seq": n} at offset n."""
    positions = produce(topic, [{"partition": p, "value": json.dumps({"p": p, "seq": n}).encode()}
                                for n in range(per_partition) for p in partitions])  # fmt: skip
    assert positions == [(p, n) for n in range(per_partition) for p in partitions]


def numbered(sink: Any) -> list[dict[str, int]]:
    """The numbered records the sink received, in arrival order."""
    return [json.loads(body) for body in sink.bodies()]


# --- tests ---------------------------------------------------------------------------------------------


def test_manifest_refs_resolve_to_the_local_functions() -> None:
    source = LocalKafkaSource(REPO / "kafka-source.yaml")

    assert source.sink_url == BY_SERVICE["project-event"].url
    assert source.dead_letter_url == BY_SERVICE["dead-letter"].url
    assert source.spec.consumer_group == "todo-projection"
    assert source.spec.initial_offset == "earliest"


def test_cloudevent_records_pass_through_unchanged(tmp_path, topic, sinks, sources) -> None:
    sink = sinks()
    binary_headers = {
        "ce_specversion": "1.0",
        "ce_id": str(uuid.uuid4()),
        "ce_source": "/todo-cqrs/commands",
        "ce_type": "todo.updated.v1",
        "ce_subject": "7",
        "ce_time": "2026-11-27T10:00:00.123Z",
    }
    binary_value = b'{"id":7,"title":"buy milk","version":2}'
    structured = {
        "specversion": "1.0",
        "id": "structured-1",
        "source": "/elsewhere",
        "type": "todo.created.v1",
        "subject": "8",
        "datacontenttype": "application/json",
        "data": {"id": 8, "version": 1},
    }
    produce(
        topic,
        [
            {
                "partition": 0,
                "key": b"7",
                "value": binary_value,
                "headers": [(k, v.encode()) for k, v in binary_headers.items()]
                + [("content-type", b"application/json")],
            },
            {
                "partition": 0,
                "key": b"8",
                "value": json.dumps(structured).encode(),
                "headers": [("content-type", b"application/cloudevents+json; charset=utf-8")],
            },
        ],
    )
    sources(write_spec(tmp_path, topic, sink=sink.url))

    wait_until(lambda: len(sink.requests) == 2, what="both events")
    binary, from_structured = sink.requests
    assert binary.ce == {k[3:]: v for k, v in binary_headers.items()}
    assert binary.headers["content-type"] == "application/json"
    assert binary.body == binary_value
    # The dispatcher reads a structured record as the event it holds and sends it in binary mode.
    assert from_structured.ce == {"specversion": "1.0", "id": "structured-1", "source": "/elsewhere",
                                  "type": "todo.created.v1", "subject": "8"}  # fmt: skip
    assert from_structured.headers["content-type"] == "application/json"
    assert json.loads(from_structured.body) == {"id": 8, "version": 1}


def test_plain_records_become_kafka_events(tmp_path, topic, sinks, sources) -> None:
    sink = sinks()
    positions = produce(
        topic,
        [
            {
                "partition": 1,
                "key": b"todo-7",
                "value": b"hello",
                "headers": [("X-Trace_Id", b"abc-1"), ("Content-Type", b"Text/Plain"), ("retries", b"2")],
            },
            {"partition": 1, "value": b"no key, no headers"},
        ],
    )
    source = sources(write_spec(tmp_path, topic, sink=sink.url))

    wait_until(lambda: len(sink.requests) == 2, what="both events")
    (p, o), (_, o2) = positions
    first, second = sink.requests
    assert {k: v for k, v in first.ce.items() if k != "time"} == {
        "specversion": "1.0",
        "type": "dev.knative.kafka.event",
        "id": f"partition:{p}/offset:{o}",
        "source": f"/apis/v1/namespaces/{source.spec.namespace}/kafkasources/{source.spec.name}#{topic}",
        "subject": f"partition:{p}#{o}",
        "key": "todo-7",
        "partitionkey": "todo-7",
        "kafkaheaderxtraceid": "abc-1",
        "kafkaheaderretries": "2",
    }
    assert first.ce["time"].endswith("Z")
    assert first.headers["content-type"] == "text/plain"
    assert first.body == b"hello"
    assert second.ce["id"] == f"partition:{p}/offset:{o2}"
    assert "key" not in second.ce
    assert second.body == b"no key, no headers"


def test_records_of_a_partition_arrive_in_order_while_other_partitions_proceed(
    tmp_path, topic, sinks, sources
) -> None:
    count = 60
    other_partition_done = threading.Event()

    def answer(request: Request) -> tuple:
        record = json.loads(request.body)
        if record["p"] == 0 and record["seq"] == 0:
            # Holds partition 0's first record until partition 1 got everything: proves parallelism.
            record_parallel.append(other_partition_done.wait(10))
        elif record["p"] == 0 and record["seq"] % 7 == 3:
            time.sleep(0.05)  # slow answers for some records must not let later ones overtake them
        if record["p"] == 1 and record["seq"] == count - 1:
            other_partition_done.set()
        return 200, b""

    record_parallel: list[bool] = []
    sink = sinks(answer)
    produce_numbered(topic, count, (0, 1))
    sources(write_spec(tmp_path, topic, sink=sink.url))

    wait_until(lambda: len(sink.requests) == 2 * count, what="every record")
    received = numbered(sink)
    for p in (0, 1):
        assert [r["seq"] for r in received if r["p"] == p] == list(range(count))
    assert record_parallel == [True]


def test_a_503_is_retried_then_the_next_record_follows(tmp_path, topic, sinks, sources) -> None:
    failures = {"A": 2}

    def answer(request: Request) -> tuple:
        if failures.get(request.body.decode(), 0) > 0:
            failures[request.body.decode()] -= 1
            return 503, b"busy"
        return 200, b""

    sink, dead_letters = sinks(answer), sinks()
    produce(topic, [{"partition": 2, "value": b"A"}, {"partition": 2, "value": b"B"}])
    sources(write_spec(tmp_path, topic, sink=sink.url, dead_letter=dead_letters.url, retry=3))

    wait_until(lambda: b"B" in sink.bodies(), what="record B")
    assert sink.bodies() == [b"A", b"A", b"A", b"B"]
    assert len({r.headers["ce-id"] for r in sink.requests[:3]}) == 1  # the same event, again
    assert dead_letters.requests == []


def arrivals(sink: RecordingSink, ordering: str) -> list[bytes] | collections.Counter[bytes]:
    """The bodies the sink got: in arrival order when ordered, as a multiset when unordered."""
    bodies = sink.bodies()
    return bodies if ordering == "ordered" else collections.Counter(bodies)


def expected(bodies: list[bytes], ordering: str) -> list[bytes] | collections.Counter[bytes]:
    return bodies if ordering == "ordered" else collections.Counter(bodies)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_a_400_goes_to_the_dead_letter_sink_with_error_extensions_and_is_not_retried(
    tmp_path, topic, sinks, sources, ordering
) -> None:
    error_body = b'{"error":{"code":"invalid_event","message":"no version"}}'

    def answer(request: Request) -> tuple:
        if request.body == b"A":
            return 400, error_body, {"kne-reason": "poison"}
        return 200, b""

    sink, dead_letters = sinks(answer), sinks()
    produce(topic, [{"partition": 0, "value": b"A"}, {"partition": 0, "value": b"B"}])
    # The sink URL comes from the constructor here, overriding the manifest's.
    spec = write_spec(
        tmp_path, topic, sink="http://127.0.0.1:9/unused", dead_letter=dead_letters.url, ordering=ordering
    )
    sources(spec, sink_url=sink.url)

    wait_until(
        lambda: b"B" in sink.bodies() and dead_letters.requests, what="B delivered and A dead-lettered"
    )
    assert arrivals(sink, ordering) == expected([b"A", b"B"], ordering)
    (dead,) = dead_letters.requests
    assert dead.body == b"A"
    [sent_a] = [r for r in sink.requests if r.body == b"A"]
    assert dead.ce["id"] == sent_a.ce["id"]
    assert dead.ce["knativeerrordest"] == sink.url
    assert dead.ce["knativeerrorcode"] == "400"
    assert base64.b64decode(dead.ce["knativeerrordata"]) == error_body
    assert dead.ce["reason"] == "poison"


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_exhausted_retries_go_to_the_dead_letter_sink(tmp_path, topic, sinks, sources, ordering) -> None:
    sink = sinks(lambda request: (503, b"down") if request.body == b"A" else (200, b""))
    dead_letters = sinks()
    produce(topic, [{"partition": 0, "value": b"A"}, {"partition": 0, "value": b"B"}])
    spec = write_spec(
        tmp_path, topic, sink=sink.url, dead_letter=dead_letters.url, retry=2, ordering=ordering
    )
    sources(spec)

    wait_until(lambda: b"B" in sink.bodies() and dead_letters.requests, what="record B and the dead letter")
    assert arrivals(sink, ordering) == expected([b"A", b"A", b"A", b"B"], ordering)
    (dead,) = dead_letters.requests
    assert (dead.body, dead.ce["knativeerrorcode"]) == (b"A", "503")
    assert base64.b64decode(dead.ce["knativeerrordata"]) == b"down"


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_a_failing_dead_letter_sink_is_retried_rather_than_the_event_lost(
    tmp_path, topic, sinks, sources, ordering
) -> None:
    # Knative would commit and lose the event here; the local runner waits for the dead-letter sink.
    sink = sinks(lambda request: (400, b"never") if request.body == b"A" else (200, b""))
    dls_failures = [500, 503]
    dead_letters = sinks(lambda request: (dls_failures.pop(0), b"") if dls_failures else (200, b""))
    produce(topic, [{"partition": 0, "value": b"A"}, {"partition": 0, "value": b"B"}])
    sources(write_spec(tmp_path, topic, sink=sink.url, dead_letter=dead_letters.url, ordering=ordering))

    wait_until(lambda: b"B" in sink.bodies() and len(dead_letters.requests) == 3, what="B and A kept")
    assert dead_letters.bodies() == [b"A", b"A", b"A"]
    assert arrivals(sink, ordering) == expected([b"A", b"B"], ordering)


def test_an_unreachable_sink_dead_letters_without_an_error_code(tmp_path, topic, sinks, sources) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{s.getsockname()[1]}/"
    dead_letters = sinks()
    produce(topic, [{"partition": 0, "value": b"A"}])
    sources(write_spec(tmp_path, topic, sink=closed_url, dead_letter=dead_letters.url, retry=1))

    wait_until(lambda: dead_letters.requests, what="the dead letter")
    (dead,) = dead_letters.requests
    assert dead.ce["knativeerrordest"] == closed_url
    assert "knativeerrorcode" not in dead.ce
    assert "knativeerrordata" not in dead.ce


def test_without_a_dead_letter_sink_a_failed_record_is_dropped_and_the_next_delivered(
    tmp_path, topic, sinks, sources
) -> None:
    sink = sinks(lambda request: (400, b"no") if request.body == b"A" else (200, b""))
    produce(topic, [{"partition": 0, "value": b"A"}, {"partition": 0, "value": b"B"}])
    sources(write_spec(tmp_path, topic, sink=sink.url))

    wait_until(lambda: b"B" in sink.bodies(), what="record B")
    assert sink.bodies() == [b"A", b"B"]


def test_a_restart_resumes_without_losing_or_skipping_a_record(tmp_path, topic, sinks, sources) -> None:
    per_partition = 50

    def slow(request: Request) -> tuple:
        time.sleep(0.01)
        return 200, b""

    sink = sinks(slow)
    produce_numbered(topic, per_partition)
    spec = write_spec(tmp_path, topic, sink=sink.url, group=f"test-group-{uuid.uuid4().hex[:10]}")

    first = sources(spec)
    wait_until(lambda: len(sink.requests) >= 40, what="the first run to be mid-stream")
    first.stop()
    in_first_run = len(sink.requests)
    assert in_first_run < PARTITIONS * per_partition, "the first run was not stopped mid-stream"
    sources(spec, sink_url=sinks(address_of=sink).url)

    everything = {(p, n) for p in range(PARTITIONS) for n in range(per_partition)}
    wait_until(lambda: {(r["p"], r["seq"]) for r in numbered(sink)} >= everything, what="every record")
    received = numbered(sink)
    assert_nothing_skipped(received)
    # The stop committed what it had delivered: the second run started right after it.
    assert len(received) == PARTITIONS * per_partition, f"{len(received) - len(everything)} duplicates"


def test_a_runner_joining_the_group_takes_partitions_over_without_loss_or_skip(
    tmp_path, topic, sinks, sources
) -> None:
    per_partition = 300

    def slow(request: Request) -> tuple:
        time.sleep(0.005)
        return 200, b""

    sink = sinks(slow)
    produce_numbered(topic, per_partition)
    spec = write_spec(tmp_path, topic, sink=sink.url)
    logs = [io.StringIO(), io.StringIO()]

    sources(spec, log_stream=logs[0])
    wait_until(lambda: len(sink.requests) >= 60, what="the first runner to be mid-stream")
    # The group rebalances: the first runner gives partitions up.
    sources(spec, log_stream=logs[1], sink_url=sinks(address_of=sink).url)

    everything = {(p, n) for p in range(PARTITIONS) for n in range(per_partition)}
    wait_until(lambda: {(r["p"], r["seq"]) for r in numbered(sink)} >= everything, what="every record")
    assert_nothing_skipped(numbered(sink))
    deliveries = [
        [json.loads(line)["msg"] for line in log.getvalue().splitlines()].count("delivered") for log in logs
    ]
    assert all(deliveries), f"both runners should have delivered: {deliveries}"


def assert_nothing_skipped(received: list[dict[str, int]]) -> None:
    """Per partition, in arrival order, a record may come again (at least once) but never past a gap."""
    for p in range(PARTITIONS):
        seqs = [r["seq"] for r in received if r["p"] == p]
        highest = -1
        for seq in seqs:
            assert seq <= highest + 1, f"partition {p} skipped from {highest} to {seq}: {seqs}"
            highest = max(highest, seq)


# --- ordering "unordered" --------------------------------------------------------------------------------


def test_unordered_delivers_every_record_once_with_several_of_a_partition_in_flight(
    tmp_path, topic, sinks, sources
) -> None:
    per_partition, in_flight = 40, 4
    lock = threading.Lock()
    now_in_flight: collections.Counter[int] = collections.Counter()
    most_in_flight: collections.Counter[int] = collections.Counter()

    def slow(request: Request) -> tuple:
        partition = json.loads(request.body)["p"]
        with lock:
            now_in_flight[partition] += 1
            most_in_flight[partition] = max(most_in_flight[partition], now_in_flight[partition])
        time.sleep(0.02)
        with lock:
            now_in_flight[partition] -= 1
        return 200, b""

    sink = sinks(slow)
    produce_numbered(topic, per_partition)
    sources(write_spec(tmp_path, topic, sink=sink.url, ordering="unordered"), in_flight=in_flight)

    everything = [(p, n) for p in range(PARTITIONS) for n in range(per_partition)]
    wait_until(lambda: len(sink.requests) >= len(everything), what="every record")
    received = [(r["p"], r["seq"]) for r in numbered(sink)]
    assert sorted(received) == everything  # each once
    assert all(2 <= most_in_flight[p] <= in_flight for p in range(PARTITIONS)), most_in_flight


def test_unordered_retries_a_503_while_the_partitions_other_records_proceed(
    tmp_path, topic, sinks, sources
) -> None:
    others = {b"B", b"C", b"D"}

    def answer(request: Request) -> tuple:
        # A succeeds only once the records after it were delivered: ordered delivery could never get there.
        if request.body == b"A" and not others <= set(sink.bodies()):
            return 503, b"busy"
        return 200, b""

    sink, dead_letters = sinks(answer), sinks()
    produce(topic, [{"partition": 2, "value": body} for body in (b"A", b"B", b"C", b"D")])
    spec = write_spec(
        tmp_path, topic, sink=sink.url, dead_letter=dead_letters.url, retry=20, ordering="unordered"
    )
    sources(spec)

    wait_until(lambda: sink.bodies().count(b"A") >= 2 and others <= set(sink.bodies()), what="A retried")
    wait_until(lambda: len(sink.bodies()) == sink.bodies().count(b"A") + len(others), what="A delivered")
    bodies = sink.bodies()
    assert sorted(b for b in bodies if b != b"A") == sorted(others)  # each once
    tries_of_a = [n for n, body in enumerate(bodies) if body == b"A"]
    assert tries_of_a[-1] > max(bodies.index(body) for body in others)  # A's success came after them
    assert len({r.headers["ce-id"] for r in sink.requests if r.body == b"A"}) == 1  # the same event, again
    assert dead_letters.requests == []


def committed_offsets(group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (negative: nothing committed)."""
    consumer = Consumer({"bootstrap.servers": settings().kafka_bootstrap_servers, "group.id": group})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_offsets_are_committed_only_past_records_that_are_done_so_a_restart_redelivers_the_unfinished(
    tmp_path, topic, sinks, sources, ordering
) -> None:
    after = [f"after-{n}".encode() for n in range(8)]
    down = threading.Event()
    down.set()
    sink = sinks(lambda request: (503, b"down") if request.body == b"first" and down.is_set() else (200, b""))
    produce(topic, [{"partition": 0, "value": body} for body in (b"first", *after)])
    spec = write_spec(tmp_path, topic, sink=sink.url, retry=30, ordering=ordering)
    group = yaml.safe_load(spec.read_text())["spec"]["consumerGroup"]

    first_run = sources(spec)
    if ordering == "unordered":  # the records after the failing one are done meanwhile
        wait_until(lambda: set(after) <= set(sink.bodies()), what="the records after the failing one")
    wait_until(lambda: sink.bodies().count(b"first") >= 3, what="the failing record's retries")
    first_run.stop()  # while "first" waits for its next retry: not done, so not committed
    in_first_run = len(sink.requests)
    assert committed_offsets(group, topic).get(0, -1) <= 0, "committed past a record still in flight"

    down.clear()
    second_run = sources(spec, sink_url=sinks(address_of=sink).url)
    wait_until(
        lambda: {b"first", *after} <= set(sink.bodies()[in_first_run:]), what="the second run's records"
    )
    second_run.stop()
    redelivered = sink.bodies()[in_first_run:]
    assert b"first" in redelivered  # the unfinished record came again: nothing was skipped
    if ordering == "ordered":
        assert redelivered == [b"first", *after]  # and nothing came twice
    assert committed_offsets(group, topic)[0] == 1 + len(after)


# --- several sources in one process ----------------------------------------------------------------------


def test_a_source_started_after_another_stopped_in_the_same_process_hears_the_answers_to_its_posts(
    tmp_path, topic, sinks, sources
) -> None:
    # Tests and tools run sources in-process. A keep-alive connection belongs to the event loop of the
    # source that opened it: reused by the next source, its answer is read by no loop (the first one
    # stopped), so the post waits for its timeout, then goes again (a duplicate) or is given up.
    sink = sinks()
    produce(topic, [{"partition": p, "value": f"first-{p}".encode()} for p in range(PARTITIONS)])
    spec = write_spec(tmp_path, topic, sink=sink.url, retry=0)
    first = sources(spec)
    wait_until(lambda: len(sink.requests) == PARTITIONS, what="the first source's records")
    first.stop()

    log = io.StringIO()
    sources(spec, log_stream=log, request_timeout_s=5)
    produce(topic, [{"partition": p, "value": f"second-{p}".encode()} for p in range(PARTITIONS)])

    def outcomes() -> list[str]:
        return [line["msg"] for line in map(json.loads, log.getvalue().splitlines()) if "offset" in line]

    dropped = "dropped: no dead-letter sink"  # no answer within the request timeout
    wait_until(lambda: outcomes().count("delivered") == PARTITIONS or dropped in outcomes(),
               timeout_s=15, what="the second source's answers")  # fmt: skip
    assert outcomes() == ["delivered"] * PARTITIONS, log.getvalue()


# --- metrics ----------------------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_page_shows_consumer_lag_per_partition_and_retries(tmp_path, topic, sinks, admin) -> None:
    release = threading.Event()
    failures = {b"flaky": 2}

    def answer(request: Request) -> tuple:
        if request.body == b"held":
            release.wait(30)  # partition 0 waits behind it: its lag is every record produced to it
        if failures.get(request.body, 0) > 0:
            failures[request.body] -= 1
            return 503, b"busy"
        return 200, b""

    sink = sinks(answer)
    produce(topic, [{"partition": 0, "value": b"held"}] + [{"partition": 0, "value": b"behind"}] * 4
            + [{"partition": 1, "value": b"quick"}, {"partition": 2, "value": b"flaky"}])  # fmt: skip
    spec = write_spec(tmp_path, topic, sink=sink.url)
    group = yaml.safe_load(spec.read_text())["spec"]["consumerGroup"]
    port = free_port()

    def lag(samples: dict[Any, float], partition: int) -> float | None:
        return samples.get(
            ("todo_kafkasource_consumer_lag", (("partition", str(partition)), ("topic", topic)))
        )

    def lags_are(wanted: dict[int, float]) -> bool:
        try:
            samples = scrape(port)
        except OSError:
            return False  # not serving yet
        return all(lag(samples, p) == value for p, value in wanted.items())

    command = [sys.executable, "-m", "tools.kafkasource", "--file", str(spec), "--metrics-port", str(port)]
    with (tmp_path / "kafkasource.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: lags_are({0: 5, 1: 0, 2: 0}), timeout_s=30, what="the lag of each partition")
        assert scrape(port)[("todo_kafkasource_retries_total", ())] == 2
        release.set()
        wait_until(lambda: lags_are({0: 0, 1: 0, 2: 0}), what="partition 0 to catch up")
        delivered = scrape(port)[("todo_kafkasource_deliveries_total", (("outcome", "delivered"),))]
        assert delivered == 7
    finally:
        release.set()
        process.terminate()
        assert process.wait(30) == 0, (tmp_path / "kafkasource.log").read_text()[-3000:]
        admin.delete_consumer_groups([group])[group].exception(10)
