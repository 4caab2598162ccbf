"""Every project_event test runs on fakes of the read store and the cache, passed in (the `client` of
tests/unit/conftest.py builds the function with the fixture its module's DEPS names; anyone may deliver)."""

from __future__ import annotations

import pytest

from tests.unit.fakes_read import FakeCache, FakeReadStore, fake_projection
from todo_cqrs.projection.handlers import Projection


@pytest.fixture
def read_model() -> FakeReadStore:
    return FakeReadStore()


@pytest.fixture
def cache() -> FakeCache:
    return FakeCache()


@pytest.fixture
def projection(read_model: FakeReadStore, cache: FakeCache) -> Projection:
    return fake_projection(read_model, cache)
