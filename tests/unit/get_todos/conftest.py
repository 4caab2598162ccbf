"""Every get_todos test runs on fakes of the read store, the version watch and the cache, passed in
(the `client` of tests/unit/conftest.py builds the function with the fixture its module's DEPS names)."""

from __future__ import annotations

import pytest

from tests.unit.fakes_read import FakeCache, FakeReadStore, FakeVersionWatch, fake_queries
from todo_cqrs.query.handlers import Queries


@pytest.fixture
def read_model() -> FakeReadStore:
    return FakeReadStore()


@pytest.fixture
def watch() -> FakeVersionWatch:
    return FakeVersionWatch()


@pytest.fixture
def cache(watch: FakeVersionWatch) -> FakeCache:
    return FakeCache(watch=watch)


@pytest.fixture
def queries(read_model: FakeReadStore, cache: FakeCache, watch: FakeVersionWatch) -> Queries:
    """get_todos' dependencies; a test changes one by assigning it (`queries.cache = UnreachableCache()`)."""
    return fake_queries(read_model, cache, watch)
