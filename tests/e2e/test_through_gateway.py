"""End to end through the gateway, with the system started by `make run`'s own start-up code."""

from __future__ import annotations

import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from todo_cqrs.adapters.read_store import todos_view
from todo_cqrs.adapters.write_store import todos
from tools.sync_db import read_db, write_db
from tools.topology import GATEWAY_PORT, HOST

pytestmark = pytest.mark.e2e


def test_create_is_readable_at_once_with_min_version(gateway):
    created = gateway.request("POST", "/todo", {"title": "read your writes"})
    assert created.status == 201
    todo_id = created.body["id"]
    assert created.headers["Location"] == f"/todo/{todo_id}"

    read = gateway.request("GET", f"/todo/{todo_id}?min_version=1")
    assert read.status == 200
    assert read.body == created.body
    assert read.headers["ETag"] == '"1"'


def test_update_shows_in_the_list_and_delete_gives_404(gateway):
    todo_id = gateway.request("POST", "/todo", {"title": "walk the dog"}).body["id"]
    updated = gateway.request("PATCH", f"/todo/{todo_id}", {"status": "IN_PROGRESS"})
    assert updated.status == 200 and updated.body["version"] == 2

    assert gateway.request("GET", f"/todo/{todo_id}?min_version=2").body["status"] == "IN_PROGRESS"
    page = gateway.request("GET", "/todo?status=IN_PROGRESS&limit=100")
    seen = {item["id"]: item for item in page.body["items"]}
    while todo_id not in seen and page.body["next_cursor"]:
        page = gateway.request("GET", f"/todo?status=IN_PROGRESS&limit=100&cursor={page.body['next_cursor']}")
        seen.update({item["id"]: item for item in page.body["items"]})
    assert seen[todo_id]["version"] == 2

    deleted = gateway.request("DELETE", f"/todo/{todo_id}")
    assert deleted.status == 200 and deleted.body["version"] == 2  # as it was before deletion
    gone = gateway.request("GET", f"/todo/{todo_id}?min_version=3")
    assert gone.status == 404
    assert gone.body["error"]["code"] == "not_found"
    assert gateway.request("PATCH", f"/todo/{todo_id}", {"title": "again"}).status == 404


def test_the_original_samples_four_requests_work_unchanged(gateway):
    """The postman collection of the NestJS sample: create, update, delete, get."""
    first = gateway.request("POST", "/todo", {"title": "Tarea 1", "description": "Descripcion 1"})
    second = gateway.request("POST", "/todo", {"title": "Tarea 2", "description": "Descripcion 2"})
    assert first.status == second.status == 201
    assert first.body["status"] == "CREATED" and first.body["description"] == "Descripcion 1"

    patched = gateway.request("PATCH", f"/todo/{first.body['id']}", {"status": "FINISHED"})
    assert patched.status == 200 and patched.body["status"] == "FINISHED"

    removed = gateway.request("DELETE", f"/todo/{second.body['id']}")
    assert removed.status == 200 and removed.body["title"] == "Tarea 2"

    got = gateway.request("GET", f"/todo/{first.body['id']}?min_version=2")
    assert got.status == 200 and got.body["status"] == "FINISHED"


def test_gateway_answers_unknown_routes_and_methods_like_the_functions(gateway):
    assert gateway.request("GET", "/nothing/here").status == 404
    wrong = gateway.request("PUT", "/todo/1", {"title": "x"})
    assert wrong.status == 405
    assert "PATCH" in wrong.headers["Allow"]


REFUSED_BY_NGINX = [  # (request line and any header of its own, status, error code, Allow)
    ("GET /todo/5%00 HTTP/1.1", 400, "bad_request", None),
    ("DELETE /todo/%zz HTTP/1.1", 400, "bad_request", None),
    ("GET /ui/../../etc/passwd HTTP/1.1", 400, "bad_request", None),
    ("GARBAGE", 400, "bad_request", None),
    ("GET /todo/5 HTTP/9.9", 505, "http_version_not_supported", None),
    ("POST /todo HTTP/1.1\r\nTransfer-Encoding: gzip", 501, "not_implemented", None),
    ("TRACE /todo/5 HTTP/1.1", 405, "method_not_allowed", "PATCH, DELETE, GET, HEAD"),
    ("TRACE /todo HTTP/1.1", 405, "method_not_allowed", "POST, GET, HEAD"),
    ("TRACE /nothing HTTP/1.1", 404, "not_found", None),
    ("GET /_gateway/400 HTTP/1.1", 404, "not_found", None),
]


@pytest.mark.parametrize(("start", "status", "code", "allow"), REFUSED_BY_NGINX)
def test_what_nginx_refuses_itself_gets_the_contracts_json_error(gateway, start, status, code, allow):
    with socket.create_connection((HOST, GATEWAY_PORT), timeout=5) as connection:
        connection.sendall(f"{start}\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    assert int(status_line.split()[1]) == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code
    assert headers.get("allow") == allow


def _random_command(gateway, rng: random.Random, live: list[int]) -> None:
    choice = rng.random()
    if not live or choice < 0.4:
        answer = gateway.request("POST", "/todo", {"title": f"t{rng.randrange(10**6)}"})
        assert answer.status == 201
        live.append(answer.body["id"])
    elif choice < 0.85:
        todo_id = rng.choice(live)
        body = rng.choice(
            [
                {"status": rng.choice(["IN_PROGRESS", "FINISHED", "CANCELED"])},
                {"title": f"u{rng.randrange(10**6)}"},
                {"description": "d" * rng.randrange(50)},
            ]
        )
        assert gateway.request("PATCH", f"/todo/{todo_id}", body).status == 200
    else:
        todo_id = live.pop(rng.randrange(len(live)))
        assert gateway.request("DELETE", f"/todo/{todo_id}").status == 200


def _rows(engine, table, ids, *extra):
    with engine.connect() as conn:
        query = sa.select(
            table.c.id,
            table.c.title,
            table.c.description,
            table.c.status,
            table.c.version,
            table.c.created_at,
            table.c.updated_at,
        ).where(table.c.id.in_(ids), *extra)
        return {tuple(row) for row in conn.execute(query)}


def test_random_commands_converge_to_the_write_model_row_for_row(gateway):
    """200 random creates, updates and deletes from 4 clients; once the pipeline drains, the read
    model holds exactly the write model's rows (deleted todos excluded)."""
    touched: list[list[int]] = [[] for _ in range(4)]
    created_ids: set[int] = set()

    def client(n: int) -> None:
        rng = random.Random(n)
        live = touched[n]
        for _ in range(50):
            before = set(live)
            _random_command(gateway, rng, live)
            created_ids.update(set(live) - before)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, range(4)))
    ids = sorted(created_ids)
    expected = _rows(write_db(), todos, ids)
    deadline = time.monotonic() + 60
    while True:
        actual = _rows(read_db(), todos_view, ids, todos_view.c.deleted == sa.false())
        if actual == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # polling the projection until it has drained, bounded by the deadline
    assert actual == expected
