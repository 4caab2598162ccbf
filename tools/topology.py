"""The local system in one declarative place: every function, its port, its Knative Service name,
and the gateway's routes (the original sample's API) onto those functions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
GATEWAY_PORT = int(os.environ.get("GATEWAY_PORT", "8080"))


@dataclass(frozen=True)
class Function:
    name: str  # folder under functions/ and the functions-framework target
    service: str  # Knative Service name (kafka-source.yaml and knative/ refer to it)
    port: int
    # "http": every function is a functions_framework.aio.http function (the CloudEvent sinks read
    # their events themselves, todo_cqrs/http.py)
    signature: str

    @property
    def source(self) -> Path:
        return REPO / "functions" / self.name / "main.py"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


_BASE_PORT = int(os.environ.get("FUNCTIONS_BASE_PORT", "8081"))
FUNCTIONS = [
    Function("create_todo", "create-todo", _BASE_PORT + 0, "http"),
    Function("update_todo", "update-todo", _BASE_PORT + 1, "http"),
    Function("delete_todo", "delete-todo", _BASE_PORT + 2, "http"),
    Function("get_todos", "get-todos", _BASE_PORT + 3, "http"),
    Function("project_event", "project-event", _BASE_PORT + 4, "http"),
    Function("relay_outbox", "relay-outbox", _BASE_PORT + 5, "http"),
    Function("dead_letter", "dead-letter", _BASE_PORT + 6, "http"),
    Function("reconcile", "reconcile", _BASE_PORT + 9, "http"),
]
BY_NAME = {f.name: f for f in FUNCTIONS}
# The local KafkaSource's Prometheus metrics (consumer lag, retries), next to the functions' ports.
KAFKASOURCE_METRICS_PORT = int(os.environ.get("KAFKASOURCE_METRICS_PORT", str(_BASE_PORT + 7)))
# The live page's pipeline health (tools/pipeline.py), behind the gateway's /ui/api/.
PIPELINE_PORT = int(os.environ.get("PIPELINE_PORT", str(_BASE_PORT + 8)))
BY_SERVICE = {f.service: f for f in FUNCTIONS}

# Gateway: (method, path pattern, function). "{id}" matches one path segment.
ROUTES = [
    ("POST", "/todo", "create_todo"),
    ("GET", "/todo", "get_todos"),
    ("PATCH", "/todo/{id}", "update_todo"),
    ("DELETE", "/todo/{id}", "delete_todo"),
    ("GET", "/todo/{id}", "get_todos"),
]
