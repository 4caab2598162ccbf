"""reconcile through functions-framework's ASGI app, with no database reachable (the unit tests'
closed ports): its routes, its health and metrics paths, and a 503 when a pass cannot reach a DB."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import assert_error, function_client


@pytest.fixture
def client() -> Iterator[TestClient]:
    """Per test: its main.py builds the pass's databases from the unit tests' settings (closed ports)."""
    with function_client("reconcile") as loaded:
        yield loaded


def test_a_pass_with_the_databases_unreachable_answers_503_with_retry_after(client: TestClient) -> None:
    response = client.post("/", json={"reason": "a tick"})

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_answer_405_with_allow(client: TestClient, method: str) -> None:
    response = client.request(method, "/")

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


def test_health_answers_without_the_databases_and_metrics_name_the_reconcile_series(
    client: TestClient,
) -> None:
    assert client.get("/healthz").status_code == 200
    exposition = client.get("/metrics").text
    for name in ("todo_reconcile_passes_total", 'todo_reconcile_drift_total{kind="extra"}'):
        assert name in exposition
