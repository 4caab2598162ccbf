"""The outbox's way to Kafka on the real write DB and Kafka: a process publishes its own rows at once,
whatever another process's lease or freeze; rows of a process that died are published by the relay
once they are orphans (OUTBOX_ORPHAN_SECONDS after their commit), in version order with what came
after them; a holder that lost its lease cannot mark rows.

The dead and frozen processes are real: a process that commits and exits before its publisher runs,
and one that takes every shard lease with the relay's own code and is then stopped with SIGSTOP, as a
paused pod or a partitioned node would be (it keeps its DB session open).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from tests.integration.test_command_side import (
    events_by_todo,
    publisher_busy,
    records_since,
    topic_end_offsets,
)
from todo_cqrs.adapters.publisher import DIRECT_WINDOW_S, Kafka
from todo_cqrs.adapters.write_store import outbox, outbox_leases
from todo_cqrs.outbox import leases
from todo_cqrs.outbox.leases import outbox_database
from todo_cqrs.outbox.relay import Relay
from todo_cqrs.settings import settings
from tools.sync_db import write_db

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

HOLD_ALL_SHARDS = """
import asyncio, sys
from todo_cqrs.outbox import leases
from todo_cqrs.outbox.leases import outbox_database
from todo_cqrs.settings import settings

async def hold() -> None:
    database = outbox_database(settings())
    shards = [int(a) for a in sys.argv[1:]] or range(settings().outbox_shards)
    held = [await leases.acquire(database, shard, settings().outbox_lease_s) for shard in shards]
    print("held" if all(held) else "busy", flush=True)
    await asyncio.sleep(3600)

asyncio.run(hold())
"""

# A command process that dies right after its commit, before its publisher ever ran.
CREATE_THEN_DIE = """
import asyncio, os, sys
from todo_cqrs import bootstrap
from todo_cqrs.command import handlers
from todo_cqrs.settings import settings

async def create() -> None:
    result = await handlers.create_todo(bootstrap.commands(settings()), {"title": sys.argv[1]})
    print(result.todo.id, flush=True)
    os._exit(0)

asyncio.run(create())
"""


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def relay(loop: asyncio.Runner) -> Iterator[Relay]:
    """The relay's tick, as relay_outbox runs it: orphans only."""
    s = settings()
    made = Relay(outbox_database(s), Kafka(s), s, min_age_s=s.outbox_orphan_s)
    yield made
    loop.run(made.aclose())  # its pool and its producer


@contextlib.contextmanager
def frozen_holding(*shards: int) -> Iterator[subprocess.Popen[str]]:
    """A relay process that holds these shards' leases (all by default), then freezes (SIGSTOP)
    with its session open."""
    free_every_lease()
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_ALL_SHARDS, *map(str, shards)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        os.kill(process.pid, signal.SIGSTOP)
        yield process
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait(10)
        free_every_lease()


def created_by_a_process_that_died(title: str) -> int:
    """The id of a todo whose create committed in a process that then died, its event unpublished."""
    result = subprocess.run(
        [sys.executable, "-c", CREATE_THEN_DIE, title],
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def free_every_lease() -> None:
    with write_db().begin() as conn:
        conn.execute(sa.update(outbox_leases).values(holder=None))


def published_at(todo_id: int) -> list[object]:
    with write_db().connect() as conn:
        rows = conn.execute(sa.select(outbox.c.published_at).where(outbox.c.todo_id == todo_id)).all()
    return [row.published_at for row in rows]


def wait_until_published(todo_id: int, bound_s: float) -> float:
    """Seconds until every outbox row of the todo is published; fails past bound_s."""
    started = time.monotonic()
    while True:
        marks = published_at(todo_id)
        if marks and all(mark is not None for mark in marks):
            return time.monotonic() - started
        assert time.monotonic() - started < bound_s, f"todo {todo_id} still pending after {bound_s} s"
        time.sleep(0.05)


def test_a_frozen_lease_holder_does_not_delay_a_live_process_events(create: TestClient) -> None:
    with frozen_holding() as frozen:
        answered = create.post("/", json={"title": f"beside a frozen relay {uuid.uuid4()}"})
        assert answered.status_code == 201
        published_s = wait_until_published(answered.json()["id"], bound_s=settings().outbox_lease_s)
        assert Path(f"/proc/{frozen.pid}/stat").read_text().split()[2] == "T"
    print(f"published in {published_s:.2f} s beside a relay frozen with every lease")  # pytest -s shows it
    assert published_s < settings().outbox_lease_s / 2  # long before any of those leases could run out


def drain_until_published(loop: asyncio.Runner, relay: Relay, todo_id: int, bound_s: float) -> float:
    """Run the relay's tick every 0.2 s until every row of the todo is published; the seconds it took."""
    started = time.monotonic()
    while not all(mark is not None for mark in published_at(todo_id)):
        assert time.monotonic() - started < bound_s, f"todo {todo_id} still pending after {bound_s} s"
        loop.run(relay.drain_all())
        time.sleep(0.2)
    return time.monotonic() - started


def test_the_relay_publishes_the_rows_of_a_process_that_died_once_they_are_orphans(
    loop: asyncio.Runner, relay: Relay
) -> None:
    orphan_s = settings().outbox_orphan_s
    todo_id = created_by_a_process_that_died(f"orphan {uuid.uuid4()}")
    committed = time.monotonic()
    assert published_at(todo_id) == [None]
    drain_until_published(loop, relay, todo_id, bound_s=orphan_s + 10)
    waited_s = time.monotonic() - committed
    print(f"an orphan published {waited_s:.2f} s after its commit (orphan after {orphan_s} s)")
    # Not before it was an orphan (its process could still have published it), nor long after.
    assert orphan_s - 1 <= waited_s <= orphan_s + 5


def test_an_event_waits_for_an_older_event_of_its_todo_left_by_a_process_that_died(
    loop: asyncio.Runner, relay: Relay, update: TestClient
) -> None:
    start = topic_end_offsets()
    todo_id = created_by_a_process_that_died(f"followed {uuid.uuid4()}")
    patched = update.patch(f"/{todo_id}", json={"status": "FINISHED"})
    assert patched.status_code == 200 and patched.json()["version"] == 2
    # Its process holds the update back, then leaves it to the relay, rather than publish it first.
    deadline = time.monotonic() + DIRECT_WINDOW_S + 5
    while publisher_busy(update):
        assert time.monotonic() < deadline, "the update's process neither published nor gave up its row"
        time.sleep(0.05)
    assert published_at(todo_id) == [None, None]
    drain_until_published(loop, relay, todo_id, bound_s=settings().outbox_orphan_s + 10)
    assert [version for _, version, _ in events_by_todo(records_since(start, [todo_id]))[todo_id]] == [1, 2]


def test_a_live_holder_keeps_its_shard_and_a_released_one_is_free_at_once(
    loop: asyncio.Runner, relay: Relay
) -> None:
    free_every_lease()
    database, length_s = relay.database, settings().outbox_lease_s
    first = loop.run(leases.acquire(database, 0, length_s))
    assert first is not None
    assert loop.run(leases.acquire(database, 0, length_s)) is None  # held and not expired
    assert loop.run(leases.renew(database, first))
    loop.run(leases.release(database, first))
    second = loop.run(leases.acquire(database, 0, length_s))
    assert second is not None and second.holder != first.holder
    loop.run(leases.release(database, second))


def test_a_holder_whose_lease_was_taken_over_cannot_mark_rows_published(
    loop: asyncio.Runner, relay: Relay, create: TestClient
) -> None:
    free_every_lease()
    database, length_s = relay.database, settings().outbox_lease_s
    todo_id = create.post("/", json={"title": f"fenced {uuid.uuid4()}"}).json()["id"]
    wait_until_published(todo_id, bound_s=10)
    shard = todo_id % settings().outbox_shards
    with write_db().begin() as conn:  # as if it had never been published, long ago: an orphan
        conn.execute(
            sa.update(outbox)
            .where(outbox.c.todo_id == todo_id)
            .values(published_at=None, occurred_at=sa.text("UTC_TIMESTAMP(3) - INTERVAL 1 HOUR"))
        )
    old = loop.run(leases.acquire(database, shard, length_s))
    assert old is not None
    with write_db().begin() as conn:  # its holder froze: the lease ran out
        conn.execute(
            sa.update(outbox_leases)
            .where(outbox_leases.c.shard == shard)
            .values(expires_at=sa.text("UTC_TIMESTAMP(3) - INTERVAL 1 SECOND"))
        )
    new = loop.run(leases.acquire(database, shard, length_s))
    assert new is not None
    with write_db().connect() as conn:
        row_ids = [r.id for r in conn.execute(sa.select(outbox.c.id).where(outbox.c.todo_id == todo_id))]
    assert loop.run(relay.mark_published(old, row_ids)) == 0  # fenced off
    assert not loop.run(leases.renew(database, old))
    drained = loop.run(relay.drain_leased(new))
    loop.run(leases.release(database, new))
    assert drained.complete and drained.published >= 1
    assert all(mark is not None for mark in published_at(todo_id))
