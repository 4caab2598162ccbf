"""What the KafkaSource does, for tests that run the functions in-process without Kafka: the todo's
newest outbox event, POSTed to project_event in binary mode."""

from __future__ import annotations

import sqlalchemy as sa
from starlette.testclient import TestClient

from tools.sync_db import write_db


def project_latest(projection: TestClient, todo_id: int) -> None:
    with write_db().connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT event_id, event_type, occurred_at, payload FROM outbox "
                "WHERE todo_id = :id ORDER BY id DESC LIMIT 1"
            ),
            {"id": todo_id},
        ).one()
    headers = {
        "ce-specversion": "1.0",
        "ce-id": row.event_id,
        "ce-source": "/todo-cqrs/commands",
        "ce-type": row.event_type,
        "ce-subject": str(todo_id),
        "ce-time": row.occurred_at.isoformat(timespec="milliseconds") + "Z",
        "content-type": "application/json",
    }
    answer = projection.post("/", content=row.payload, headers=headers)
    assert answer.status_code == 200, answer.text
