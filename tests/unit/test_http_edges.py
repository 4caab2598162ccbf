"""The HTTP edge every function shares: framework routes and health paths answer like the contract.

No fake is needed: these requests never reach a handler or a dependency.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from tests.unit.fakes import FakeWriteStore, function_client


@pytest.fixture(scope="module", params=["update_todo", "project_event"])
def client(request: pytest.FixtureRequest) -> Iterator[FlaskClient]:
    with function_client(request.param) as loaded:
        yield loaded


def test_framework_answers_have_the_json_error_body(client: FlaskClient) -> None:
    """update_todo: the framework's own /favicon.ico route; project_event: a GET, which only POST serves."""
    response = client.get("/favicon.ico")
    expected = {"update_todo": (404, "not_found"), "project_event": (405, "method_not_allowed")}
    assert (response.status_code, response.get_json()["error"]["code"]) == expected[client.application.name]


def test_health_path_answers_200_and_other_methods_405(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    response = client.put("/healthz")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


def test_event_that_is_not_a_cloud_event_is_400_for_the_dead_letter_sink() -> None:
    with function_client("project_event") as loaded:
        response = loaded.post("/", data=b"hello", headers={"Content-Type": "text/plain"})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_event"


@pytest.mark.parametrize("function", ["create_todo", "update_todo", "delete_todo"])
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_path_answers_200_without_the_write_store(
    function: str, path: str, store: FakeWriteStore
) -> None:
    """With the fake write store unreachable, health stays cheap: it touches no dependency."""
    store.unreachable = True
    with function_client(function) as loaded:
        response = loaded.get(path)
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})
