"""With OTEL_EXPORTER_OTLP_ENDPOINT set, a function exports its spans over OTLP/HTTP: its server span
under the caller's traceparent, and the SQLAlchemy instrumentation's statement spans under it.

The function runs as `make run` runs it (python -m todo_cqrs.serve), against the real write DB and
Kafka; the collector is a small HTTP server in the test that keeps what it is sent.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

REPO = Path(__file__).resolve().parents[2]


class Collector(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[object] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            with self.server.lock:
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        self.server.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def traced_create_todo(collector: Collector, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "K_SERVICE": "create-todo",
        "WORKERS": "1",
    }
    argv = [
        sys.executable, "-m", "todo_cqrs.serve", "--target", "create_todo",
        "--source", str(REPO / "functions/create_todo/main.py"), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = (tmp_path / "create_todo.log").open("wb")
    process = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "create_todo.log"
                ).read_text()
                time.sleep(0.05)
        yield url
    finally:
        os.killpg(process.pid, 15)
        process.wait(20)
        log.close()


def test_spans_are_exported_under_the_callers_trace_with_the_statements_beneath(
    collector: Collector, traced_create_todo: str
) -> None:
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    request = urllib.request.Request(
        f"{traced_create_todo}/todo",
        data=json.dumps({"title": "exported"}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "traceparent": f"00-{trace_id}-{caller_span}-01"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201

    def of_this_trace() -> list:
        with collector.lock:
            return [s for s in collector.spans if s.trace_id.hex() == trace_id]

    deadline = time.monotonic() + 15
    while not any(s.parent_span_id.hex() == caller_span for s in of_this_trace()):
        assert time.monotonic() < deadline, "no exported server span under the caller's span"
        time.sleep(0.05)
    server = next(s for s in of_this_trace() if s.parent_span_id.hex() == caller_span)
    assert server.name == "POST /todo"
    while not any(s.parent_span_id == server.span_id for s in of_this_trace()):
        assert time.monotonic() < deadline, "no statement span under the server span"
        time.sleep(0.05)
    statements = [s for s in of_this_trace() if s.parent_span_id == server.span_id]
    attributes = {kv.key: kv.value.string_value for s in statements for kv in s.attributes}
    assert attributes.get("db.system") in ("mysql", "mariadb")
