"""The HTTP edge every function shares (todo_cqrs/http.py): framework routes, methods the framework
does not route, health paths. Every function runs on fakes of every dependency, all of them down
where the test says so: none of these requests may need one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import (
    ALL_FUNCTIONS,
    HTTP_FUNCTIONS,
    Fakes,
    assert_error,
    assert_error_body,
    faked_function,
)

# The methods each function serves on `/` (the sinks: any path); the framework routes these seven.
ALLOWED = {
    "create_todo": "POST",
    "update_todo": "PATCH",
    "delete_todo": "DELETE",
    "get_todos": "GET, HEAD",
    "relay_outbox": "POST",
    "project_event": "POST",
    "dead_letter": "POST",
}
ITEM_PATH = {"update_todo": "/7", "delete_todo": "/7", "get_todos": "/7"}


@pytest.fixture(scope="module", params=ALL_FUNCTIONS)
def loaded(request: pytest.FixtureRequest) -> Iterator[tuple[str, TestClient, Fakes]]:
    with faked_function(request.param) as (client, fakes):
        yield request.param, client, fakes


@pytest.fixture
def function(loaded: tuple[str, TestClient, Fakes]) -> str:
    return loaded[0]


@pytest.fixture
def client(loaded: tuple[str, TestClient, Fakes]) -> TestClient:
    return loaded[1]


@pytest.fixture
def fakes(loaded: tuple[str, TestClient, Fakes], monkeypatch: pytest.MonkeyPatch) -> Fakes:
    """Fresh fakes for this test, every dependency down (relay_outbox keeps the fake it was loaded with)."""
    fresh = Fakes(relay=loaded[2].relay.reset()).install(monkeypatch)
    fresh.outage()
    return fresh


@pytest.mark.parametrize("path", ["/favicon.ico", "/robots.txt"])
def test_framework_routes_answer_404_with_the_json_error_body(client: TestClient, path: str) -> None:
    """functions-framework routes GET of these two to a plain-text 404 of its own, before the function."""
    assert_error(client.get(path), 404, "not_found")


def test_method_the_framework_does_not_route_answers_405_with_the_json_error_body_and_allow(
    client: TestClient, function: str
) -> None:
    """The framework routes seven methods to the function; Starlette answers any other one itself."""
    response = client.request("TRACE", ITEM_PATH.get(function, "/"))

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == ALLOWED[function]


def test_path_holding_an_encoded_newline_answers_with_the_json_error_body(
    client: TestClient, function: str
) -> None:
    """The framework's catch-all route is a regex whose `.*` stops at a newline: Starlette then
    answers a plain-text 404 of its own, before the function."""
    method = ALLOWED[function].split(",")[0]

    response = client.request(method, "/todo/a%0Ab")

    assert response.status_code in (400, 404), (response.status_code, response.content)
    assert_error_body(response)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_path_answers_200_with_every_dependency_down(
    client: TestClient, fakes: Fakes, path: str
) -> None:
    response = client.get(path)

    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert response.headers["content-type"] == "application/json"
    assert fakes.store.transactions == fakes.read_model.reads == 0


def test_health_path_answers_head(client: TestClient, fakes: Fakes) -> None:
    response = client.head("/healthz")

    assert (response.status_code, response.content) == (200, b"")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_health_path_answers_other_methods_405_with_allow(
    client: TestClient, fakes: Fakes, method: str
) -> None:
    response = client.request(method, "/healthz")

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("function_name", HTTP_FUNCTIONS)
def test_unknown_deeper_path_answers_404_on_every_http_function(function_name: str) -> None:
    with faked_function(function_name) as (client, _):
        response = client.request(ALLOWED[function_name].split(",")[0], "/todo/7/history")

    assert_error(response, 404, "not_found")
