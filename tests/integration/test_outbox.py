"""Shard leases of the outbox on the real write DB and Kafka: a frozen holder stalls its shard for at
most one lease, never the others for longer, and a holder that lost its lease cannot mark rows.

The frozen publisher is a real process that takes the leases with the relay's own code and is then
stopped with SIGSTOP, as a paused pod or a partitioned node would be: it keeps its DB session open.
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from local.sync_db import write_db
from todo_cqrs import db
from todo_cqrs.adapters.write_store import outbox, outbox_leases
from todo_cqrs.command import relay
from todo_cqrs.settings import settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

HOLD_ALL_SHARDS = """
import asyncio, sys
from todo_cqrs.command import relay
from todo_cqrs.settings import settings

async def hold() -> None:
    shards = [int(a) for a in sys.argv[1:]] or range(settings().outbox_shards)
    leases = [await relay.acquire(shard) for shard in shards]
    print("held" if all(leases) else "busy", flush=True)
    await asyncio.sleep(3600)

asyncio.run(hold())
"""


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner
        for engine in (relay.publisher_engine, db.write_engine):
            made = runner.run(_peek(engine))
            if made is not None:
                runner.run(made.dispose())


async def _peek(loop_local: object) -> object:
    return loop_local.peek()  # type: ignore[attr-defined]


@contextlib.contextmanager
def frozen_holding(*shards: int) -> Iterator[subprocess.Popen[str]]:
    """A publisher process that holds these shards' leases (all by default), then freezes (SIGSTOP)
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


@pytest.fixture
def frozen_holder() -> Iterator[subprocess.Popen[str]]:
    with frozen_holding() as process:
        yield process


def free_every_lease() -> None:
    with write_db().begin() as conn:
        conn.execute(sa.update(outbox_leases).values(holder=None))


def wait_until_released(shard: int, bound_s: float = 10.0) -> None:
    deadline = time.monotonic() + bound_s
    while True:
        with write_db().connect() as conn:
            holder = conn.execute(
                sa.select(outbox_leases.c.holder).where(outbox_leases.c.shard == shard)
            ).scalar()
        if holder is None:
            return
        assert time.monotonic() < deadline, f"shard {shard} still held by {holder}"
        time.sleep(0.02)


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


@pytest.fixture(scope="module")
def create(function_client: Callable[[str], TestClient]) -> TestClient:
    return function_client("create_todo")


def test_a_frozen_lease_holder_delays_another_process_events_by_at_most_one_lease(
    frozen_holder: subprocess.Popen[str], create: TestClient
) -> None:
    lease_s = settings().outbox_lease_s
    answered = create.post("/", json={"title": f"behind a frozen publisher {uuid.uuid4()}"})
    assert answered.status_code == 201
    stalled_s = wait_until_published(answered.json()["id"], bound_s=lease_s + 10)
    # The frozen process still holds its DB session: only the lease's expiry let the other one in.
    assert Path(f"/proc/{frozen_holder.pid}/stat").read_text().split()[2] == "T"
    print(f"stalled behind the frozen holder: {stalled_s:.2f} s (lease {lease_s} s)")  # pytest -s shows it
    # One lease (5 s), then the takeover: the bound is about 10 s, kept on a loaded machine too.
    assert stalled_s <= lease_s + 5


def test_a_frozen_holder_of_one_shard_does_not_delay_the_other_shards(create: TestClient) -> None:
    """Shards drain independently, each under its own lease: publishing is not one drainer for all."""
    shards = settings().outbox_shards
    assert shards > 1
    created: list[int] = []
    with frozen_holding(0):
        while (
            todo_id := create.post("/", json={"title": f"off shard 0 {uuid.uuid4()}"}).json()["id"]
        ) % shards == 0:
            created.append(todo_id)
        published_s = wait_until_published(todo_id, bound_s=settings().outbox_lease_s)
    print(f"shard {todo_id % shards} published in {published_s:.2f} s beside a frozen shard 0")
    assert published_s < settings().outbox_lease_s / 2  # long before shard 0's lease could run out
    # Leave no publisher busy for the next test: shard 0's rows go out once the frozen holder is gone.
    for stalled in created:
        wait_until_published(stalled, bound_s=settings().outbox_lease_s + 5)
    wait_until_released(0)


def test_a_live_holder_keeps_its_shard_and_a_released_one_is_free_at_once(loop: asyncio.Runner) -> None:
    free_every_lease()
    first = loop.run(relay.acquire(0))
    assert first is not None
    assert loop.run(relay.acquire(0)) is None  # held and not expired
    assert loop.run(relay.renew(first))
    loop.run(relay.release(first))
    second = loop.run(relay.acquire(0))
    assert second is not None and second.holder != first.holder
    loop.run(relay.release(second))


def test_a_holder_whose_lease_was_taken_over_cannot_mark_rows_published(
    loop: asyncio.Runner, create: TestClient
) -> None:
    free_every_lease()
    todo_id = create.post("/", json={"title": f"fenced {uuid.uuid4()}"}).json()["id"]
    wait_until_published(todo_id, bound_s=10)
    shard = todo_id % settings().outbox_shards
    wait_until_released(shard)  # the function's publisher keeps a lease a moment after its last row
    with write_db().begin() as conn:  # as if it had been published: pending again
        conn.execute(sa.update(outbox).where(outbox.c.todo_id == todo_id).values(published_at=None))
    old = loop.run(relay.acquire(shard))
    assert old is not None
    with write_db().begin() as conn:  # its holder froze: the lease ran out
        conn.execute(
            sa.update(outbox_leases)
            .where(outbox_leases.c.shard == shard)
            .values(expires_at=sa.text("UTC_TIMESTAMP(3) - INTERVAL 1 SECOND"))
        )
    new = loop.run(relay.acquire(shard))
    assert new is not None
    with write_db().connect() as conn:
        row_ids = [r.id for r in conn.execute(sa.select(outbox.c.id).where(outbox.c.todo_id == todo_id))]
    assert loop.run(relay._mark_published(old, row_ids)) == 0  # fenced off
    assert not loop.run(relay.renew(old))
    drained = loop.run(relay.drain_leased(new))
    loop.run(relay.release(new))
    assert drained.complete and drained.published >= 1
    assert all(mark is not None for mark in published_at(todo_id))
