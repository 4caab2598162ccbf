"""Every get_todos test runs on fakes of the read model, the version watch and the cache."""

from __future__ import annotations

import pytest

from tests.unit.fakes import FakeCache, FakeReadModel, FakeVersionWatch


@pytest.fixture(autouse=True)
def read_model(monkeypatch: pytest.MonkeyPatch) -> FakeReadModel:
    return FakeReadModel().install(monkeypatch)


@pytest.fixture(autouse=True)
def watch(monkeypatch: pytest.MonkeyPatch) -> FakeVersionWatch:
    return FakeVersionWatch().install(monkeypatch)


@pytest.fixture(autouse=True)
def cache(monkeypatch: pytest.MonkeyPatch, watch: FakeVersionWatch) -> FakeCache:
    return FakeCache(watch=watch).install(monkeypatch)
