"""Functions in-process, as the integration tests run them: each on its own event loop, in its TestClient's
thread, as it would run in its own process, with the dependencies it was built with closed at the end."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.testclient import TestClient

from tests.unit.fakes import client_of, load_main
from todo_cqrs import serve
from todo_cqrs.command.handlers import Commands
from todo_cqrs.loop_local import close_loop_resources
from tools.topology import REPO

PUBLISHER_SETTLE_S = 10.0


async def close_deps(deps: Any) -> None:
    """Close what a function's dependencies made in this loop; a command function's publisher first
    finishes what its commands committed (bounded), so nothing is cut off halfway and nothing is left
    for the flush at exit."""
    if isinstance(deps, Commands):
        outbox = getattr(deps.publisher, "in_this_loop", lambda: None)()
        if outbox is not None:
            await outbox.stop(within_s=PUBLISHER_SETTLE_S)
    await deps.aclose()


_deps_of: weakref.WeakKeyDictionary[TestClient, Any] = weakref.WeakKeyDictionary()


def deps_of(function: TestClient) -> Any:
    """The dependencies an in-process function was built with."""
    return _deps_of[function]


@contextmanager
def running_function(name: str) -> Iterator[TestClient]:
    """functions/<name>/main.py as `make run` serves it (todo_cqrs/serve.py), on its own loop in a thread,
    with the dependencies its main.py builds from the settings (closed at the end)."""
    app = serve.load(name, str(REPO / "functions" / name / "main.py"))
    deps = getattr(sys.modules["main"], "deps", None)
    with TestClient(app) as client:
        _deps_of[client] = deps
        try:
            yield client
        finally:
            client.portal.call(close_loop_resources if deps is None else lambda: close_deps(deps))


@contextmanager
def running_with(name: str, deps: Any) -> Iterator[TestClient]:
    """functions/<name>/main.py built with the given dependencies (real ones, some of them swapped), on
    its own loop in a thread; they are closed at the end."""
    with client_of(load_main(name).build(deps)) as client:
        _deps_of[client] = deps
        try:
            yield client
        finally:
            client.portal.call(close_deps, deps)
