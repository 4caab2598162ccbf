"""todo_cqrs/serve.py: the function's requests straight to it, and everything else to functions-framework's
own app, exactly where the framework's router would have sent them."""

from __future__ import annotations

from types import ModuleType

import functions_framework.aio
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from todo_cqrs import serve

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get"]
PATHS = [
    "/",
    "/todo/7",
    "/robots.txt",
    "/favicon.ico",
    "/robots.txt/x",
    "/robots.txt%0A",
    "/a%0A",
    "/a%0Ab",
    "/a%0A%0A",
    "/%0A",
    "/healthz",
]


class Recording:
    """An http function that answers with what it was asked, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Request) -> Response:
        self.calls += 1
        return JSONResponse({"method": request.method, "path": request.url.path}, headers={"x-function": "1"})


def framework_app(function: Recording) -> serve.ASGIApp:
    async def target(request: Request) -> Response:
        return await function(request)

    module = ModuleType("served")
    module.target = target  # type: ignore[attr-defined]
    app: serve.ASGIApp = functions_framework.aio.create_asgi_app_from_module(
        "target", "main.py", "http", module, None
    )
    return app


def answer(app: serve.ASGIApp, method: str, path: str) -> tuple[int, str, bytes, str | None]:
    with TestClient(app) as client:
        response = client.request(method, path)
    return (
        response.status_code,
        response.headers.get("content-type", ""),
        response.content,
        response.headers.get("allow"),
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", METHODS)
def test_a_request_reaches_the_function_exactly_when_the_framework_would_route_it_there(
    method: str, path: str
) -> None:
    """The same answer as functions-framework's own app, and the function called in the same cases."""
    by_framework, direct = Recording(), Recording()

    expected = answer(framework_app(by_framework), method, path)
    served = answer(serve.direct(direct, framework_app(Recording())), method, path)

    assert served == expected
    assert direct.calls == by_framework.calls


def test_the_function_is_called_without_the_framework_in_between() -> None:
    """What the framework routes to the function does not go through the framework's app at all."""
    function = Recording()

    async def no_framework(scope: object, receive: object, send: object) -> None:
        raise AssertionError("the framework's app was called")

    client = TestClient(serve.direct(function, no_framework))  # not entered: no lifespan
    response = client.post("/todo", json={})

    assert response.status_code == 200 and response.json() == {"method": "POST", "path": "/todo"}
    assert function.calls == 1
