"""Fixtures of the per-function unit tests: the function under test and the fakes of its I/O."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from tests.unit.fakes import FakeWriteStore, PublishRecorder, function_client


@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest) -> Iterator[FlaskClient]:
    """The module's function (named by its FUNCTION), through functions-framework's own Flask app."""
    with function_client(request.module.FUNCTION) as test_client:
        yield test_client


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FakeWriteStore:
    """A fake write store (todos and outbox in memory) in place of the write database."""
    return FakeWriteStore().install(monkeypatch)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> PublishRecorder:
    """A fake publisher that counts the commands' publish calls instead of draining to Kafka."""
    return PublishRecorder().install(monkeypatch)
