"""Read-model-only todos for projection and query tests that share the databases with other tests.

Ids come from a high random range no command ever reaches, and each one is tombstoned (through the
projection) when its test ends, so a comparison of the read model with the write model ignores them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest

from tests.integration.read_model_ids import DELETED, FINAL_VERSION, HIGH_IDS
from todo_cqrs.projection.handlers import project_event


@pytest.fixture
def new_ids() -> Iterator[Callable[[int], list[int]]]:
    """n fresh consecutive read-model-only ids; each is tombstoned at the end of the test."""
    used: list[int] = []

    def make(n: int = 1) -> list[int]:
        first = HIGH_IDS + secrets.randbelow(HIGH_IDS)
        used.extend(range(first, first + n))
        return list(range(first, first + n))

    yield make
    for todo_id in used:
        project_event(DELETED, {"id": todo_id, "version": FINAL_VERSION})


@pytest.fixture
def new_id(new_ids: Callable[[int], list[int]]) -> Callable[[], int]:
    """One fresh read-model-only id at a time."""
    return lambda: new_ids(1)[0]
