"""The old sync runtime's limits, kept as reference rows: bare Flask `functions_framework.http` functions
under `functions-framework` (gunicorn gthread; the bench runs them with 1 worker x 16 threads for the
query side, 1 x 8 for commands, the sync runtime's settings), so the table shows what the async runtime
gained. Same bodies and work as main.py, with the blocking clients (redis-py, PyMySQL, one connection
per thread). Local tooling only; never deployed.
"""

from __future__ import annotations

import threading
from functools import cache

import flask
import functions_framework
import pymysql
import redis
from sqlalchemy.engine import make_url

from todo_cqrs.settings import settings

BODY = (
    b'{"id":1,"title":"limit","description":"","status":"CREATED","version":1,'
    b'"created_at":"2026-11-27T10:00:00.123Z","updated_at":"2026-11-27T10:00:00.123Z"}'
)
LIMIT_TABLE = "bench_limit"  # created by the bench in the bench write database
_local = threading.local()


def _answer(status: int = 200) -> flask.Response:
    return flask.Response(BODY, status=status, content_type="application/json")


@cache
def _redis() -> redis.Redis:
    # Created on first use, i.e. in the worker after gunicorn's fork.
    return redis.Redis.from_url(settings().redis_url, socket_timeout=1)


def _connection() -> pymysql.Connection:
    # One connection per worker thread: no pool, no pre-ping, nothing between the request and the DB.
    conn = getattr(_local, "conn", None)
    if conn is None:
        url = make_url(settings().write_db_url)
        conn = _local.conn = pymysql.connect(
            host=url.host,
            port=url.port or 3306,
            user=url.username,
            password=url.password or "",
            database=url.database,
            autocommit=False,
        )
    return conn


@functions_framework.http
def constant(request: flask.Request) -> flask.Response:
    return _answer()


@functions_framework.http
def redis_get(request: flask.Request) -> flask.Response:
    _redis().get("todo:1")
    return _answer()


@functions_framework.http
def db_commit(request: flask.Request) -> flask.Response:
    if request.path == "/healthz":  # the bench's readiness probe must not write
        return _answer()
    conn = _connection()
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {LIMIT_TABLE} (payload) VALUES (%s)", (BODY,))
    conn.commit()
    return _answer(201)
