"""Fixtures of the integration tests: one event loop for the test's own async calls, the functions
in-process, and read-model-only todos.

The core makes its engines and Redis clients once per event loop, so every direct call of a test goes
through the session's runner (`run(coroutine)`), and each in-process function has its own loop, in
its TestClient's thread, as it would in its own process. Both are closed at the end, connections
first.

Read-model-only todos (projection and query tests that share the databases with other tests): ids
come from a high random range no command ever reaches, and each one is tombstoned (through the
projection) when its test ends, so a comparison of the read model with the write model ignores them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.integration.in_process import close_deps, running_function
from tests.integration.read_model_ids import DELETED, FINAL_VERSION, HIGH_IDS
from tests.integration.settings_override import InLoop, Run
from todo_cqrs import bootstrap
from todo_cqrs.command.handlers import Commands
from todo_cqrs.loop_local import close_loop_resources
from todo_cqrs.projection.handlers import Projection, project_event
from todo_cqrs.settings import settings


@pytest.fixture(scope="session")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as session_runner:
        yield session_runner
        session_runner.run(close_loop_resources())


@pytest.fixture(scope="session")
def run(runner: asyncio.Runner) -> Run[Any]:
    """Runs a coroutine on the session's event loop (the one every direct call of the core shares)."""
    return runner.run


@pytest.fixture(scope="session")
def in_runner(runner: asyncio.Runner) -> InLoop:
    """Calls an async function on the session's event loop."""
    return lambda function: runner.run(function())


@pytest.fixture(scope="session")
def commands(run: Run[Any]) -> Iterator[Commands]:
    """The command side's real dependencies, for the tests' direct calls on the session's loop."""
    deps = bootstrap.commands(settings())
    yield deps
    run(close_deps(deps))


@pytest.fixture(scope="session")
def projection(run: Run[Any]) -> Iterator[Projection]:
    """The projection's real dependencies, for the tests' direct calls on the session's loop."""
    deps = bootstrap.projection(settings())
    yield deps
    run(deps.aclose())


@pytest.fixture(scope="module")
def function_client() -> Iterator[Callable[[str], TestClient]]:
    """Starts a function in-process for the rest of the module: `function_client("create_todo")`."""
    with ExitStack() as stack:
        yield lambda name: stack.enter_context(running_function(name))


@pytest.fixture(scope="module")
def create(function_client: Callable[[str], TestClient]) -> TestClient:
    return function_client("create_todo")


@pytest.fixture(scope="module")
def update(function_client: Callable[[str], TestClient]) -> TestClient:
    return function_client("update_todo")


@pytest.fixture(scope="module")
def delete(function_client: Callable[[str], TestClient]) -> TestClient:
    return function_client("delete_todo")


@pytest.fixture
def new_ids(run: Run[Any], projection: Projection) -> Iterator[Callable[[int], list[int]]]:
    """n fresh consecutive read-model-only ids; each is tombstoned at the end of the test."""
    used: list[int] = []

    def make(n: int = 1) -> list[int]:
        first = HIGH_IDS + secrets.randbelow(HIGH_IDS)
        used.extend(range(first, first + n))
        return list(range(first, first + n))

    yield make

    async def tombstone_all() -> None:
        deletions = (project_event(projection, DELETED, {"id": i, "version": FINAL_VERSION}) for i in used)
        await asyncio.gather(*deletions)

    run(tombstone_all())


@pytest.fixture
def new_id(new_ids: Callable[[int], list[int]]) -> Callable[[], int]:
    """One fresh read-model-only id at a time."""
    return lambda: new_ids(1)[0]
