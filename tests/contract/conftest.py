"""Fixtures of the contract tests: each fake of tests/unit stands for an adapter, and the same cases run
against both, so what a unit test proves through the fake holds for the real thing.

A case's real-adapter parameter asks for the session's `services` (tests/conftest.py): the local
MariaDB and Redis. Each case runs its calls on an event loop of its own (`loop`), and closes the real
adapter's connections on it before the loop ends.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator

import pytest

from tests.integration.read_model_ids import HIGH_IDS


@pytest.fixture
def loop() -> Iterator[asyncio.Runner]:
    """The event loop of one case's calls."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def fresh_ids() -> Callable[[int], list[int]]:
    """n consecutive todo ids from a random high range no command reaches, so a case shares the read
    database and Redis with everyone else (the read store's cases tombstone theirs at the end)."""

    def make(n: int = 1) -> list[int]:
        first = HIGH_IDS + secrets.randbelow(HIGH_IDS)
        return list(range(first, first + n))

    return make
