"""A dependency frozen mid-run (SIGSTOP), through the gateway of the whole local system.

Each test resumes what it froze in a `finally`, then checks that the system converges.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from local import services

pytestmark = pytest.mark.e2e


@contextmanager
def frozen(name: str) -> Iterator[None]:
    services.pause(name)
    try:
        yield
    finally:
        services.resume(name)


def test_frozen_redis_reads_bypass_the_cache_and_the_projection_catches_up(gateway):
    todo = gateway.request("POST", "/todo", {"title": "cache me"}).body
    assert gateway.request("GET", f"/todo/{todo['id']}?min_version=1").status == 200

    with frozen("redis"):
        read = gateway.request("GET", f"/todo/{todo['id']}")
        assert (read.status, read.headers["X-Cache"]) == (200, "bypass")
        assert read.body == todo
        listed = gateway.request("GET", "/todo?limit=1")
        assert (listed.status, listed.headers["X-Cache"]) == (200, "bypass")
        # Commands do not need Redis; the projection answers 503 until Redis is back and is retried.
        assert gateway.request("PATCH", f"/todo/{todo['id']}", {"status": "FINISHED"}).status == 200

    caught_up = gateway.request("GET", f"/todo/{todo['id']}?min_version=2")
    if caught_up.status == 503:  # the KafkaSource's linear backoff may still be waiting for its next try
        caught_up = _read_until_version(gateway, todo["id"], 2)
    assert (caught_up.status, caught_up.body["status"]) == (200, "FINISHED")


def test_frozen_kafka_commands_still_succeed_and_events_arrive_after(gateway):
    with frozen("kafka"):
        created = gateway.request("POST", "/todo", {"title": "written while Kafka sleeps"})
        assert created.status == 201
        updated = gateway.request("PATCH", f"/todo/{created.body['id']}", {"description": "still fine"})
        assert updated.status == 200 and updated.body["version"] == 2

    read = _read_until_version(gateway, created.body["id"], 2)
    assert (read.status, read.body) == (200, updated.body)


def test_frozen_database_gives_503_with_retry_after_and_nothing_is_lost(gateway):
    todo = gateway.request("POST", "/todo", {"title": "before the freeze"}).body

    with frozen("mariadb"):
        refused = gateway.request("PATCH", f"/todo/{todo['id']}", {"title": "during the freeze"})
        assert refused.status == 503
        assert refused.body["error"]["code"] == "dependency_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1

    after = gateway.request("PATCH", f"/todo/{todo['id']}", {"title": "after the freeze"})
    assert after.status == 200 and after.body["version"] == 2  # the refused change wrote nothing
    read = _read_until_version(gateway, todo["id"], 2)
    assert read.body["title"] == "after the freeze"


def _read_until_version(gateway, todo_id: int, version: int, attempts: int = 15):
    """Read-your-writes, retried while the server says not_yet_consistent (each try waits ~2 s)."""
    for _ in range(attempts):
        answer = gateway.request("GET", f"/todo/{todo_id}?min_version={version}")
        if answer.status != 503:
            return answer
    return answer
