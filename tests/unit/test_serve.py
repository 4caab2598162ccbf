"""todo_cqrs/serve.py: the function's requests straight to it, and everything else to functions-framework's
own app, exactly where the framework's router would have sent them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import functions_framework.aio
import pytest
import uvicorn
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


# --- each response in one send --------------------------------------------------------------------------


class RecordingTransport:
    """A transport that records what is written to it, and what else is done with it, in order."""

    def __init__(self) -> None:
        self.done: list[object] = []

    def write(self, data: bytes) -> None:
        self.done.append(bytes(data))

    def close(self) -> None:
        self.done.append("close")

    def is_closing(self) -> bool:
        self.done.append("is_closing")
        return False


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


def test_a_head_and_the_body_written_after_it_leave_in_one_write() -> None:
    async def respond() -> list[object]:
        sent = RecordingTransport()
        transport = serve._OneSendTransport(sent)  # type: ignore[arg-type]
        transport.write(HEAD)
        assert sent.done == []
        transport.write(b"{}")
        assert sent.done == [HEAD + b"{}"]
        await asyncio.sleep(0)  # the end of the loop's pass: nothing is left to send
        return sent.done

    assert asyncio.run(respond()) == [HEAD + b"{}"]


def test_a_head_alone_leaves_at_the_end_of_the_loops_pass() -> None:
    async def respond() -> list[object]:
        sent = RecordingTransport()
        transport = serve._OneSendTransport(sent)  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert sent.done == []
        await asyncio.sleep(0)
        return sent.done

    assert asyncio.run(respond()) == [b"HTTP/1.1 100 Continue\r\n\r\n"]


def test_anything_else_done_with_the_transport_sends_a_held_head_first() -> None:
    async def respond() -> list[object]:
        sent = RecordingTransport()
        transport = serve._OneSendTransport(sent)  # type: ignore[arg-type]
        transport.write(HEAD)
        assert transport.is_closing() is False
        transport.close()
        await asyncio.sleep(0)
        return sent.done

    assert asyncio.run(respond()) == [HEAD, "is_closing", "close"]


def test_what_is_not_a_head_is_written_at_once() -> None:
    sent = RecordingTransport()
    transport = serve._OneSendTransport(sent)  # type: ignore[arg-type]
    transport.write(b"a body chunk")
    transport.write(memoryview(b"HTTP/1.0 is no head of ours"))
    assert sent.done == [b"a body chunk", b"HTTP/1.0 is no head of ours"]


def test_a_server_holding_heads_still_answers_every_request_whole() -> None:
    """uvicorn with OneSendProtocol, on a real socket: keep-alive responses, HEAD, 100-continue, a
    request it cannot parse, and Connection: close, each answered whole."""

    async def app(scope: serve.Scope, receive: serve.Receive, send: serve.Send) -> None:
        assert scope["type"] == "http"
        body = (await receive())["body"] or scope["path"].encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=serve.OneSendProtocol, lifespan="off", log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            reader = conn.makefile("rb")
            for path in (b"/first", b"/second"):
                conn.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _response(reader) == (b"HTTP/1.1 200 OK", path)
            conn.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _response(reader, head=True) == (b"HTTP/1.1 200 OK", b"")
            conn.sendall(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
            assert reader.readline() == b"\r\n"
            conn.sendall(b"data")
            assert _response(reader) == (b"HTTP/1.1 200 OK", b"data")
            conn.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _response(reader) == (b"HTTP/1.1 200 OK", b"/last")
            assert reader.read() == b""  # closed after the whole response
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"NOT HTTP\r\n\r\n")
            assert conn.makefile("rb").readline().startswith(b"HTTP/1.1 400")
    finally:
        server.should_exit = True
        thread.join(5)


def _response(reader: Any, head: bool = False) -> tuple[bytes, bytes]:
    status = reader.readline().rstrip(b"\r\n")
    length = 0
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, b"" if head else reader.read(length)


def test_a_quiet_server_wakes_once_a_second_and_at_once_on_a_signal_to_stop() -> None:
    """The functions' server: its main loop does uvicorn's periodic work once a second (uvicorn's own
    wakes ten times a second), and a signal to stop ends it well before the next tick."""
    ticks: list[float] = []

    class Counted(serve.QuietServer):
        async def on_tick(self, counter: int) -> bool:
            ticks.append(time.monotonic())
            assert counter % 10 == 0  # uvicorn does its periodic work on these
            return await super().on_tick(counter)

    async def app(scope: serve.Scope, receive: serve.Receive, send: serve.Send) -> None:
        raise AssertionError("no request is sent")

    server = Counted(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5 * serve.QuietServer.TICK_S
        while len(ticks) < 3:
            assert time.monotonic() < deadline, f"ticks: {ticks}"
            time.sleep(0.01)
        gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False)]
        assert min(gaps) >= 0.9 * serve.QuietServer.TICK_S, gaps
        asked = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        thread.join(5)
        assert not thread.is_alive()
        assert time.monotonic() - asked < serve.QuietServer.TICK_S / 2
    finally:
        server.should_exit = True
        thread.join(5)


FUNCTION_SOURCE = """
import functions_framework.aio
from starlette.responses import Response


@functions_framework.aio.http
async def hello(request):
    return Response(b"hello")
"""


def test_a_served_function_stops_at_once_when_only_its_master_is_told_to_stop(tmp_path: Path) -> None:
    """SIGINT to gunicorn's master alone (not to its process group): the master sends its worker SIGQUIT,
    and kills it only after its graceful timeout (30 s); the worker stops at once instead."""
    source = tmp_path / "main.py"
    source.write_text(FUNCTION_SOURCE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "todo_cqrs.serve", "--target", "hello", "--source", str(source)]
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as answer:
                    assert answer.read() == b"hello"
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        asked = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        assert time.monotonic() - asked < 10  # not gunicorn's graceful timeout of 30 s
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
