"""The HTTP edge every function shares (todo_cqrs/http.py): what functions-framework answers itself
(unpatched: in plain text), health paths. Every function runs on fakes of every dependency, all of them down
where the test says so: none of these requests may need one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.requests import Request
from starlette.testclient import TestClient

from tests.unit.fakes import (
    ALL_FUNCTIONS,
    HTTP_FUNCTIONS,
    Fakes,
    assert_error,
    assert_error_body,
    faked_function,
)
from todo_cqrs.domain import errors
from todo_cqrs.http import read_body, status_of

# The methods each function serves on `/` (the sinks: any path).
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
def fakes(loaded: tuple[str, TestClient, Fakes]) -> Fakes:
    """Fresh fakes for this test (those the function was built with, reset), every dependency down."""
    fresh = loaded[2].reset()
    fresh.outage()
    return fresh


# The seven methods functions-framework routes to the function (its Allow when it refuses another).
FRAMEWORK_METHODS = "GET, POST, PUT, DELETE, OPTIONS, HEAD, PATCH"


def assert_framework_answer(response: Any, status: int) -> None:
    """functions-framework's own refusal, unpatched: Starlette's plain text, before the function."""
    assert response.status_code == status, (response.status_code, response.content)
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    assert response.text == {404: "Not Found", 405: "Method Not Allowed"}[status]


@pytest.mark.parametrize("path", ["/favicon.ico", "/robots.txt"])
def test_framework_answers_get_of_its_two_routes_404_in_plain_text(client: TestClient, path: str) -> None:
    """functions-framework routes GET (and HEAD) of these two to a 404 of its own."""
    assert_framework_answer(client.get(path), 404)


@pytest.mark.parametrize("path", ["/favicon.ico", "/robots.txt"])
def test_framework_routes_other_methods_of_its_two_paths_to_the_function(
    client: TestClient, function: str, path: str
) -> None:
    """Only GET and HEAD are the framework's there: the function answers every other method itself."""
    response = client.request("DELETE", path)

    assert_error_body(response)
    assert response.status_code in (400, 404, 405), (response.status_code, response.content)


def test_framework_answers_a_method_it_does_not_route_405_in_plain_text_with_its_allow(
    client: TestClient, function: str
) -> None:
    """The framework routes seven methods to the function; Starlette answers any other one itself."""
    response = client.request("TRACE", ITEM_PATH.get(function, "/"))

    assert_framework_answer(response, 405)
    assert set(response.headers["Allow"].split(", ")) == set(FRAMEWORK_METHODS.split(", "))


def test_framework_answers_a_path_holding_an_encoded_newline_404_in_plain_text(
    client: TestClient, function: str
) -> None:
    """The framework's catch-all route is a regex whose `.*` stops at a newline: Starlette then
    answers a 404 of its own, before the function."""
    method = ALLOWED[function].split(",")[0]

    assert_framework_answer(client.request(method, "/todo/a%0Ab"), 404)


def test_functions_framework_is_not_patched() -> None:
    """The framework's module keeps its own router pieces: nothing of the project replaces them."""
    import functions_framework.aio
    import starlette.applications

    assert functions_framework.aio.Starlette is starlette.applications.Starlette
    assert functions_framework.aio._handle_not_found.__module__ == "functions_framework.aio"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_path_answers_200_with_every_dependency_down(
    client: TestClient, fakes: Fakes, path: str
) -> None:
    response = client.get(path)

    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert response.headers["content-type"] == "application/json"
    assert fakes.store.transactions == fakes.read_model.reads == 0


def test_a_health_probe_has_a_command_function_connect_its_publisher_ahead_of_the_first_command(
    function: str, client: TestClient, fakes: Fakes
) -> None:
    client.get("/healthz")
    client.get("/readyz")

    commands = function in ("create_todo", "update_todo", "delete_todo")
    assert fakes.published.warm_ups == (2 if commands else 0)
    assert fakes.published.calls == fakes.store.transactions == 0


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


def test_a_body_that_stops_arriving_is_refused_408_within_the_deadline() -> None:
    async def stalled() -> None:
        parts = [{"type": "http.request", "body": b'{"title": ', "more_body": True}]

        async def receive() -> dict[str, Any]:
            if parts:
                return parts.pop()
            await asyncio.Event().wait()  # the client sends no more
            raise AssertionError("unreachable")

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"30")]}
        started = time.monotonic()
        with pytest.raises(errors.RequestTimeout):
            await read_body(Request(scope, receive), timeout_s=0.05)
        assert time.monotonic() - started < 5

    asyncio.run(stalled())
    assert status_of(errors.RequestTimeout("x")) == 408
