"""Traces across the asynchronous hop and Prometheus metrics, through the whole local system."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from todo_cqrs.settings import settings
from tools.run import LOG_DIR
from tools.topology import BY_NAME, KAFKASOURCE_METRICS_PORT

pytestmark = pytest.mark.e2e


def log_lines(function: str, **match: Any) -> list[dict[str, Any]]:
    lines = []
    with (LOG_DIR / f"{function}.log").open() as log:
        for line in log:
            if line.startswith("{"):
                record = json.loads(line)
                if all(record.get(k) == v for k, v in match.items()):
                    lines.append(record)
    return lines


def wait_for_log_line(function: str, **match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while not (lines := log_lines(function, **match)):
        assert time.monotonic() < deadline, f"no {function} log line with {match}"
        time.sleep(0.05)
    return lines[-1]


def kafka_headers_of(todo_id: int) -> list[dict[str, str]]:
    """The headers of every record of this todo on the topic."""
    s = settings()
    consumer = Consumer({"bootstrap.servers": s.kafka_bootstrap_servers, "group.id": f"e2e-{uuid.uuid4()}"})
    try:
        partitions = [TopicPartition(s.topic, p, 0) for p in range(s.topic_partitions)]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in partitions}
        consumer.assign(partitions)
        found, done = [], {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + 20
        while len(done) < len(ends):
            assert time.monotonic() < deadline, "the topic was not read to its end"
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            if message.key() == str(todo_id).encode():
                found.append({k: v.decode() for k, v in message.headers() or []})
            if message.offset() + 1 >= ends[message.partition()]:
                done.add(message.partition())
        return found
    finally:
        consumer.close()


def test_a_commands_trace_continues_on_kafka_and_in_project_event(gateway):
    trace_id, parent_span = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{parent_span}-01"
    created = gateway.request(
        "POST", "/todo", {"title": "traced"}, headers={"traceparent": traceparent, "tracestate": "vendor=1"}
    )
    assert created.status == 201
    todo_id = created.body["id"]
    assert gateway.request("GET", f"/todo/{todo_id}?min_version=1").status == 200

    command = wait_for_log_line("create_todo", todo_id=todo_id)
    assert command["trace_id"] == trace_id and command["span_id"] != parent_span

    [headers] = kafka_headers_of(todo_id)
    assert headers["ce_traceparent"] == f"00-{trace_id}-{command['span_id']}-01"
    assert headers["ce_tracestate"] == "vendor=1"

    projected = wait_for_log_line("project_event", event_id=headers["ce_id"])
    assert projected["trace_id"] == trace_id
    assert projected["span_id"] not in (parent_span, command["span_id"])


def test_a_request_without_trace_context_starts_a_trace_and_its_log_line_names_it(gateway):
    created = gateway.request("POST", "/todo", {"title": "untraced"})
    line = wait_for_log_line("create_todo", todo_id=created.body["id"])
    assert len(line["trace_id"]) == 32 and len(line["span_id"]) == 16
    assert int(line["trace_id"], 16) and int(line["span_id"], 16)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in samples.items() if n == name and all((k, x) in ls for k, x in labels.items())
    )


def test_metrics_of_every_function_move_with_traffic(gateway):
    urls = {name: function.url for name, function in BY_NAME.items()}
    before = {name: scrape(url) for name, url in urls.items()}
    created = gateway.request("POST", "/todo", {"title": "counted"}).body
    assert gateway.request("GET", f"/todo/{created['id']}?min_version=1").status == 200
    for _ in range(3):
        assert gateway.request("GET", f"/todo/{created['id']}").status == 200
    after = {name: scrape(url) for name, url in urls.items()}

    def moved(function: str, name: str, **labels: str) -> float:
        return total(after[function], name, **labels) - total(before[function], name, **labels)

    assert moved("create_todo", "todo_http_requests_total", route="/", method="POST", status="201") == 1
    assert moved("get_todos", "todo_http_requests_total", route="/{id}", method="GET", status="200") == 4
    assert moved("get_todos", "todo_cache_reads_total", kind="item", result="hit") >= 2
    assert moved("get_todos", "todo_min_version_wait_seconds_count") == 1
    assert moved("project_event", "todo_projection_events_total", outcome="applied") >= 1
    assert moved("project_event", "todo_projection_lag_seconds_count") >= 1
    assert moved("create_todo", "todo_http_request_duration_seconds_count", route="/") == 1
    for function in urls:
        assert total(after[function], "process_resident_memory_bytes") > 0  # every function serves one
    kafkasource = scrape(f"http://127.0.0.1:{KAFKASOURCE_METRICS_PORT}")
    lags = {
        dict(labels)["partition"] for (name, labels) in kafkasource if name == "todo_kafkasource_consumer_lag"
    }
    assert lags == {str(p) for p in range(settings().topic_partitions)}
    assert total(kafkasource, "todo_kafkasource_deliveries_total", outcome="delivered") >= 1
