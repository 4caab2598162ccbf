"""Fixtures shared by every test folder.

Tests under tests/integration and tests/e2e use the real local MariaDB, Redis and Kafka: the
`services` fixture starts what is not running (and stops, at the end of the session, only what it
started), then applies the migrations and the role users' grants. The tests act as the admin (DB user
`todo`, Redis user `default`, with the generated local secrets); the functions `make run` starts act as
their roles (tools/credentials.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools import credentials

credentials.use_admin()


@pytest.fixture(scope="session")
def services() -> Iterator[None]:
    from todo_cqrs.migrations import upgrade
    from tools import services as local_services

    before = set(local_services.running_services())
    local_services.ensure_services()
    upgrade()
    local_services.ensure_roles()
    yield
    started_here = [name for name in local_services.running_services() if name not in before]
    if started_here:
        local_services.stop_services(started_here)


@pytest.fixture(autouse=True)
def _log_lines_written_during_the_test() -> Iterator[None]:
    """The functions' log lines leave in batches (every 50 ms); write them out before the test ends, so
    that capture shows them with their test and none arrives after pytest's summary."""
    yield
    from todo_cqrs import logs

    logs.flush()
