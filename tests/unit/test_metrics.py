"""GET /metrics on every function, run on fakes of every dependency (tests/unit/fakes.py): the
Prometheus text format, counting every request it answers.

The registry is the process's (one process per function in production); in this test process every
function shares it, so counts are compared before and after, and the `function` label is not checked.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from tests.unit.fakes import ALL_FUNCTIONS, Fakes, assert_error, faked_function

# One request per function that its HTTP edge answers with an error, and where it is counted.
FAILING_REQUEST = {
    "create_todo": ("POST", "/todo", 400, "bad_request", "/"),
    "update_todo": ("PATCH", "/todo/7", 400, "bad_request", "/{id}"),
    "delete_todo": ("DELETE", "/todo/x", 400, "bad_request", "other"),  # no route takes that id
    "get_todos": ("GET", "/todo/7", 404, "not_found", "/{id}"),
    "relay_outbox": ("GET", "/", 405, "method_not_allowed", "/"),
    "project_event": ("POST", "/", 400, "invalid_event", "/"),
    "dead_letter": ("POST", "/", 400, "invalid_event", "/"),
}


@pytest.fixture(scope="module")
def module_fakes() -> Fakes:
    return Fakes()


@pytest.fixture(scope="module", params=ALL_FUNCTIONS)
def loaded(request: pytest.FixtureRequest, module_fakes: Fakes) -> Iterator[tuple[str, TestClient]]:
    with faked_function(request.param, module_fakes) as (client, _):
        yield request.param, client


@pytest.fixture
def fakes(loaded: tuple[str, TestClient], module_fakes: Fakes) -> Fakes:
    """Fresh fakes for this test: those the functions were built with, reset."""
    return module_fakes.reset()


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, by name and labels; the answer must be 200 in the text format."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_total(samples: dict, route: str, method: str, status: int) -> float:
    """todo_http_requests_total{route, method, status}, summed over the function label."""
    wanted = {("route", route), ("method", method), ("status", str(status))}
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "todo_http_requests_total" and wanted <= set(labels)
    )


def test_metrics_answers_200_in_the_prometheus_text_format(
    loaded: tuple[str, TestClient], fakes: Fakes
) -> None:
    client = loaded[1]
    client.get("/healthz")

    response = client.get("/metrics")

    assert response.status_code == 200
    assert "# TYPE todo_http_requests_total counter" in response.text
    assert "# TYPE todo_http_request_duration_seconds histogram" in response.text
    assert requests_total(scrape(client), "/healthz", "GET", 200) >= 1


def test_metrics_answers_head_without_a_body(loaded: tuple[str, TestClient], fakes: Fakes) -> None:
    response = loaded[1].head("/metrics")

    assert (response.status_code, response.content) == (200, b"")


def test_metrics_counts_every_request_by_route_method_and_status(
    loaded: tuple[str, TestClient], fakes: Fakes
) -> None:
    function, client = loaded
    method, path, status, code, route = FAILING_REQUEST[function]
    before = scrape(client)

    for _ in range(3):
        assert_error(client.request(method, path), status, code)
    client.get("/healthz")

    after = scrape(client)
    assert requests_total(after, route, method, status) - requests_total(before, route, method, status) == 3
    assert requests_total(after, "/healthz", "GET", 200) - requests_total(before, "/healthz", "GET", 200) == 1
    # The scrape before this one was counted too.
    assert requests_total(after, "/metrics", "GET", 200) - requests_total(before, "/metrics", "GET", 200) == 1


def test_metrics_times_every_request(loaded: tuple[str, TestClient], fakes: Fakes) -> None:
    client = loaded[1]
    key = "todo_http_request_duration_seconds_count"

    def count(samples: dict) -> float:
        return sum(
            v for (name, labels), v in samples.items() if name == key and ("route", "/healthz") in labels
        )

    before = scrape(client)
    client.get("/healthz")
    client.get("/healthz")

    assert count(scrape(client)) - count(before) == 2


def test_metrics_path_answers_other_methods_405(loaded: tuple[str, TestClient], fakes: Fakes) -> None:
    response = loaded[1].post("/metrics")

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD"
