"""relay_outbox built with a fake relay and a fake write store (no write DB, no Kafka): what a tick does
with them, and how it answers. The relay itself runs against MariaDB and Kafka in
tests/integration/test_outbox.py."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import FakeRelay, FakeWriteStore, assert_error
from todo_cqrs.outbox.relay import RelayTick
from todo_cqrs.sender_identity import NoCheck

FUNCTION = "relay_outbox"
DEPS = "tick"


@pytest.fixture
def relay() -> FakeRelay:
    return FakeRelay()


@pytest.fixture
def tick(relay: FakeRelay, store: FakeWriteStore) -> RelayTick:
    return RelayTick(relay, store, lambda: None, NoCheck)  # no gauges


@pytest.mark.parametrize("path", ["/", "/todo"])
def test_tick_publishes_what_is_pending_and_purges_expired_keys(
    client: TestClient, relay: FakeRelay, store: FakeWriteStore, path: str
) -> None:
    relay.pending, store.expired_keys = 3, 2

    response = client.post(path)

    assert (response.status_code, response.json()) == (200, {"published": 3, "expired_keys_deleted": 2})
    assert (relay.pending, store.expired_keys, relay.drains) == (0, 0, 1)


def test_tick_with_nothing_pending_publishes_nothing(client: TestClient, relay: FakeRelay) -> None:
    assert client.post("/").json() == {"published": 0, "expired_keys_deleted": 0}


def test_tick_takes_any_body(client: TestClient, relay: FakeRelay) -> None:
    """A PingSource posts a CloudEvent of its own; the relay does not read it."""
    response = client.post("/", content=b"\xff" * 10, headers={"content-type": "application/octet-stream"})

    assert response.status_code == 200


def test_write_db_unreachable_answers_503_with_retry_after(client: TestClient, relay: FakeRelay) -> None:
    relay.unreachable = True

    response = client.post("/")

    assert_error(response, 503, "dependency_unavailable")
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_answer_405_with_allow(client: TestClient, relay: FakeRelay, method: str) -> None:
    response = client.request(method, "/")

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"
    assert relay.drains == 0


@pytest.mark.parametrize("path", ["/1", "/todo/1", "/x/y"])
def test_paths_other_than_the_collection_answer_404(client: TestClient, relay: FakeRelay, path: str) -> None:
    assert_error(client.post(path), 404, "not_found")
    assert relay.drains == 0


def test_health_path_answers_200_without_the_write_db(client: TestClient, relay: FakeRelay) -> None:
    relay.unreachable = True

    assert (client.get("/healthz").status_code, client.get("/healthz").json()) == (200, {"status": "ok"})
