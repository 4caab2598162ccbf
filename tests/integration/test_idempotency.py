"""Idempotency-Key on the real write DB: a repeat answers the first answer and writes nothing, a reuse
with another body is refused, a key whose first request is still in its transaction answers 409."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from todo_cqrs.adapters.write_store import MariaDbUnitOfWork, WriteStore, idempotency_keys, outbox, todos
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.db import Database
from todo_cqrs.settings import settings
from tools.sync_db import write_db

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]


def count(table: sa.Table, where: sa.ColumnElement[bool]) -> int:
    with write_db().connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar_one())


def test_a_repeated_post_answers_the_first_answer_and_creates_nothing(create: TestClient) -> None:
    key = f"key-{uuid.uuid4()}"
    body = {"title": f"pay rent {uuid.uuid4()}", "description": "once"}
    first = create.post("/", json=body, headers={"Idempotency-Key": key})
    again = create.post("/todo", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    for header in ("ETag", "Location", "Content-Type"):
        assert again.headers[header] == first.headers[header]
    assert count(todos, todos.c.title == body["title"]) == 1
    assert count(outbox, outbox.c.todo_id == first.json()["id"]) == 1


def test_the_same_key_with_another_body_is_422_and_writes_nothing(create: TestClient) -> None:
    key = f"key-{uuid.uuid4()}"
    assert create.post("/", json={"title": "first use"}, headers={"Idempotency-Key": key}).status_code == 201
    title = f"second use {uuid.uuid4()}"
    reused = create.post("/", json={"title": title}, headers={"Idempotency-Key": key})
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert count(todos, todos.c.title == title) == 0


class RolledBack(Exception):
    pass


def test_a_key_held_by_a_transaction_in_flight_answers_409_then_works_once_it_is_gone(
    create: TestClient,
) -> None:
    key_text = f"key-{uuid.uuid4()}"
    body = {"title": f"in flight {uuid.uuid4()}"}
    key = IdempotencyKey.of(key_text, "POST /todo", body, None)
    assert key is not None
    holding, release = threading.Event(), threading.Event()

    async def first_request_in_flight() -> None:
        # A first request with this key, mid-transaction (its row taken, not committed), then rolled back.
        s = settings()
        store = WriteStore(Database.write(s), s.outbox_shards, s.idempotency_ttl_s)

        async def claim_then_fail(uow: MariaDbUnitOfWork) -> None:
            assert await uow.claim(key) is None
            holding.set()
            await asyncio.to_thread(release.wait, 10)
            raise RolledBack

        try:
            with pytest.raises(RolledBack):
                await store.run(claim_then_fail, None)
        finally:
            await store.aclose()

    first = threading.Thread(target=asyncio.run, args=(first_request_in_flight(),))
    first.start()
    try:
        assert holding.wait(10)
        busy = create.post("/", json=body, headers={"Idempotency-Key": key_text})
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "idempotency_key_in_flight"
        assert busy.headers["Retry-After"] == "1"
    finally:
        release.set()
        first.join(10)
    assert create.post("/", json=body, headers={"Idempotency-Key": key_text}).status_code == 201
    assert count(todos, todos.c.title == body["title"]) == 1


def test_keys_are_kept_a_day_and_an_expired_key_is_free_again(create: TestClient) -> None:
    key_text = f"key-{uuid.uuid4()}"
    assert (
        create.post("/", json={"title": "day one"}, headers={"Idempotency-Key": key_text}).status_code == 201
    )
    key = IdempotencyKey.of(key_text, "", None, None)
    assert key is not None
    where = idempotency_keys.c.key_hash == key.key_hash
    with write_db().connect() as conn:
        kept_s = conn.execute(
            sa.select(
                sa.func.timestampdiff(
                    sa.text("SECOND"), idempotency_keys.c.created_at, idempotency_keys.c.expires_at
                )
            ).where(where)
        ).scalar_one()
    assert kept_s == 24 * 3600
    with write_db().begin() as conn:  # a day later
        conn.execute(sa.update(idempotency_keys).where(where).values(expires_at=sa.text("UTC_TIMESTAMP(3)")))
    title = f"day two {uuid.uuid4()}"
    again = create.post("/", json={"title": title}, headers={"Idempotency-Key": key_text})
    assert again.status_code == 201 and again.json()["title"] == title


def test_expired_keys_are_purged_by_the_relay(
    create: TestClient, function_client: Callable[[str], TestClient]
) -> None:
    key_text = f"key-{uuid.uuid4()}"
    create.post("/", json={"title": "to purge"}, headers={"Idempotency-Key": key_text})
    key = IdempotencyKey.of(key_text, "", None, None)
    assert key is not None
    where = idempotency_keys.c.key_hash == key.key_hash
    with write_db().begin() as conn:
        conn.execute(
            sa.update(idempotency_keys)
            .where(where)
            .values(expires_at=sa.text("UTC_TIMESTAMP(3) - INTERVAL 1 SECOND"))
        )
    relay = function_client("relay_outbox")
    assert relay.post("/", json={}).json()["expired_keys_deleted"] >= 1
    assert count(idempotency_keys, where) == 0


def test_a_repeated_patch_answers_the_first_answer_and_bumps_the_version_once(
    create: TestClient, update: TestClient
) -> None:
    todo = create.post("/", json={"title": f"patch me {uuid.uuid4()}"}).json()
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}", "If-Match": '"1"'}
    first = update.patch(f"/{todo['id']}", json={"status": "FINISHED"}, headers=key)
    again = update.patch(f"/{todo['id']}", json={"status": "FINISHED"}, headers=key)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and first.json()["version"] == 2
    assert count(outbox, outbox.c.todo_id == todo["id"]) == 2  # created + one update


def test_a_repeated_delete_answers_the_first_answer_and_deletes_once(
    create: TestClient, delete: TestClient
) -> None:
    todo = create.post("/", json={"title": f"delete me {uuid.uuid4()}"}).json()
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    first = delete.delete(f"/{todo['id']}", headers=key)
    again = delete.delete(f"/todo/{todo['id']}", headers=key)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["ETag"] == first.headers["ETag"] == '"1"'
    assert count(todos, todos.c.id == todo["id"]) == 0
    assert count(outbox, outbox.c.todo_id == todo["id"]) == 2  # created + one delete
    gone = delete.delete(f"/{todo['id']}")  # without the key: the todo is gone
    assert gone.status_code == 404
