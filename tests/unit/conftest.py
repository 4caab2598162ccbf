"""Fixtures of the per-function unit tests: the function under test and the fakes of its I/O.

Unit tests need no service. So that a fake that was forgotten fails a test instead of reaching a local
MariaDB, Redis or Kafka that happens to run, every unit test sees settings whose databases, Redis and
Kafka are a closed port.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import FakeWriteStore, PublishRecorder, client_of, function_client, load_main
from todo_cqrs import logs
from todo_cqrs.command.handlers import Commands
from todo_cqrs.dead_letter.store import from_settings
from todo_cqrs.settings import settings

CLOSED_PORT = "127.0.0.1:1"  # nothing listens there
NO_SERVICES = {
    "WRITE_DB_URL": f"mysql+aiomysql://todo:x@{CLOSED_PORT}/todo_write",
    "READ_DB_URL": f"mysql+aiomysql://todo:x@{CLOSED_PORT}/todo_read",
    "REDIS_URL": f"redis://{CLOSED_PORT}/0",
    "KAFKA_BOOTSTRAP_SERVERS": CLOSED_PORT,
    "DEAD_LETTER_STORE": "dir",
    "DB_TIMEOUT_SECONDS": "0.5",
}


@pytest.fixture(autouse=True)
def no_services(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Settings that point every dependency at a closed port (and dead letters into tmp_path)."""
    for name, value in NO_SERVICES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DEAD_LETTER_DIR", str(tmp_path / "dead-letters"))
    settings.cache_clear()
    from_settings.cache_clear()
    yield
    settings.cache_clear()
    from_settings.cache_clear()


@pytest.fixture(autouse=True)
def written_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every request's log line is written to fd 1 when its test ends, while pytest captures it.

    The log writer's own 50 ms timer would hand lines to its thread at any moment, also between two
    tests when fd 1 is the terminal: here only the explicit flush writes.
    """
    monkeypatch.setenv("LOG_FLUSH_SECONDS", "3600")
    yield
    logs.flush()


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """The module's function (named by its FUNCTION), built by its main.py's `build` with the fakes of the
    fixture its DEPS names; without DEPS, functions-framework's own app of the real main.py."""
    deps = getattr(request.module, "DEPS", None)
    if deps is None:
        with function_client(request.module.FUNCTION) as test_client:
            yield test_client
        return
    function = load_main(request.module.FUNCTION).build(request.getfixturevalue(deps))
    with client_of(function) as test_client:
        yield test_client


@pytest.fixture
def store() -> FakeWriteStore:
    """A fake write store (todos, outbox, idempotency keys in memory) in place of the write database."""
    return FakeWriteStore()


@pytest.fixture
def published() -> PublishRecorder:
    """A fake outbox publisher that records the commands' commits instead of draining to Kafka."""
    return PublishRecorder()


@pytest.fixture
def commands(store: FakeWriteStore, published: PublishRecorder) -> Commands:
    """A command function's dependencies: the fake store and publisher (DEPS = "commands")."""
    return Commands(store, published)
