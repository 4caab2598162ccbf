"""Serve a function as `functions-framework --asgi` does (gunicorn, one uvicorn worker, uvloop, httptools),
with the function's own requests handed to it directly.

    python -m todo_cqrs.serve --target NAME --source functions/NAME/main.py [--host H] [--port P]

functions-framework's app routes every request through Starlette's middleware stack, its router and its
execution-id wrapper before the function, and the function (todo_cqrs/http.py) already routes, answers
errors and logs by itself. Served through that stack, a cache hit cost get_todos 0.12-0.17 ms of CPU;
served directly, 0.08-0.10 ms (docs/performance.md). `direct` wraps the framework's app (its public
`create_asgi_app_from_module`): what the framework would route to the function goes straight to it;
what the framework answers itself (`/robots.txt` and `/favicon.ico`, a method it does not route, the
lifespan) still goes to the framework.

The worker is functions-framework's (uvicorn's, on httptools), but each response leaves in one send:
uvicorn writes a response's head and its body apart, two system calls and two segments that each wake
the client (`OneSendProtocol`; a cache hit cost 0.071-0.077 ms of CPU instead of 0.082-0.084). And its
server's main loop wakes once a second, not ten times (`QuietServer`): an idle function process used
0.5-0.7 ms of CPU a second instead of 1.3-1.7.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any

import functions_framework.aio
import uvicorn
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from starlette.requests import Request
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Endpoint = Callable[[Request], Awaitable[Response]]  # what an http function is

# What functions-framework routes to an http function: these methods, on every path but its own two.
FRAMEWORK_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"})
FRAMEWORK_PATHS = frozenset({"/robots.txt", "/favicon.ico"})  # a 404 of its own, for GET (and HEAD)


def goes_to_function(scope: Scope) -> bool:
    """Whether functions-framework's router would hand this request to the function. Its catch-all
    route is Starlette's `^/(?P<path>.*)$`, matched (not fully): `.` stops at a newline, and `$` also
    matches before a last one."""
    if scope["type"] != "http" or scope["method"] not in FRAMEWORK_METHODS:
        return False
    path = scope["path"].removesuffix("\n")
    if "\n" in path:
        return False  # no route matches: the framework's 404
    return path not in FRAMEWORK_PATHS or scope["method"] not in ("GET", "HEAD")


def direct(function: Endpoint, framework: ASGIApp) -> ASGIApp:
    """The framework's app, with the requests it would route to `function` handed to it directly."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if goes_to_function(scope):
            response = await function(Request(scope, receive))
            await response(scope, receive, send)
        else:
            await framework(scope, receive, send)

    return app


def load(target: str, source: str) -> ASGIApp:
    """The function's source loaded as functions-framework loads it (a module named after its file, its
    folder on sys.path), served by `direct`."""
    path = Path(source).resolve()
    spec = importlib.util.spec_from_file_location(
        path.stem, path, submodule_search_locations=[str(path.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.append(str(path.parent))
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    framework = functions_framework.aio.create_asgi_app_from_module(target, str(path), "http", module, spec)
    return direct(getattr(module, target), framework)


class _OneSendTransport:
    """A connection's transport whose response head waits for the body written right after it, so a
    response leaves in one send instead of two: uvicorn writes the head when the app starts the response
    and the body when it sends it, and each write is a system call, and a segment that wakes the client.
    A head is held until the next write, or the end of the event loop's current pass at the latest;
    anything else done with the transport sends it first."""

    _HEAD = b"HTTP/1.1 "

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif bytes(data[:9]) == self._HEAD:
            self._held = bytes(data)
            asyncio.get_running_loop().call_soon(self._send_held)
            return
        self._transport.write(data)

    def _send_held(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            self._transport.write(held)

    def __getattr__(self, name: str) -> Any:
        self._send_held()
        return getattr(self._transport, name)


class OneSendProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, each response in one send (`_OneSendTransport`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneSendTransport(transport))  # type: ignore[arg-type]


class QuietServer(uvicorn.Server):
    """uvicorn's server, whose main loop wakes once a second instead of ten times a second. uvicorn's
    wakes every 0.1 s to see whether it should stop, and does its periodic work (the Date header, which
    counts seconds, and the worker's heartbeat to gunicorn) every tenth time. A signal to stop wakes it
    at once instead; `should_exit` set by anything else is seen within a second."""

    TICK_S = 1.0

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken = asyncio.Event()

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        while not await self.on_tick(0):  # a multiple of 10: the periodic work on every tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.TICK_S)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._wake()

    def stop(self) -> None:
        """Shut down as on SIGTERM (the connections' requests finish), without a signal to raise again
        once stopped (uvicorn raises the signals it caught once its handlers are restored)."""
        self.should_exit = True
        self._wake()

    def _wake(self) -> None:
        if self._loop is not None:  # maybe from a signal handler: the loop may be anywhere in its pass
            self._loop.call_soon_threadsafe(self._woken.set)


class Worker(UvicornWorker):
    """functions-framework's uvicorn worker, its responses each in one send, its server a QuietServer
    that SIGQUIT stops.

    gunicorn's master sends its workers SIGQUIT when it is asked to stop at once (SIGINT, SIGQUIT), and
    SIGKILL after its graceful timeout (30 s). UvicornWorker's SIGQUIT handler only clears gunicorn's
    `alive` flag, which nothing in a uvicorn worker reads: the worker kept serving for those 30 s."""

    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "http": OneSendProtocol}

    async def _serve(self) -> None:
        # UvicornWorker's, with a QuietServer for uvicorn's Server, stopped by SIGQUIT.
        self.config.app = self.wsgi
        server = QuietServer(config=self.config)
        asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, server.stop)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class Server(BaseApplication):
    """gunicorn with functions-framework's options for an ASGI app: WORKERS uvicorn workers (1), no
    worker timeout, errors only in its own log."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.options = {
            "bind": f"{host}:{port}",
            "workers": int(os.environ.get("WORKERS", 1)),
            "worker_class": Worker,
            "timeout": 0,
            "loglevel": "error",
            "limit_request_line": 0,
        }
        self.application = app
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> ASGIApp:
        return self.application


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m todo_cqrs.serve", description=__doc__.splitlines()[0])
    target = os.environ.get("FUNCTION_TARGET")
    parser.add_argument("--target", default=target, required=target is None, help="the function's name")
    parser.add_argument("--source", required=True, help="its main.py")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)), help="default: $PORT")
    args = parser.parse_args(argv)
    Server(load(args.target, args.source), args.host, args.port).run()


if __name__ == "__main__":
    main()
