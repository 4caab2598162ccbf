"""The bench's limits on the functions' runtime: bare `functions_framework.aio.http` functions, served as
the functions are (`python -m todo_cqrs.serve`: gunicorn + uvicorn worker, uvloop, httptools) with the same
server settings as the function each one bounds, so the gap between a limit and a function is the
function's own work.

`constant` answers a fixed todo-sized JSON body; `redis_get` adds one redis.asyncio GET (the cache-hit
path's floor); `db_commit` adds one INSERT + COMMIT on the write database through aiomysql directly, from
a pool of connections opened once (no SQLAlchemy, no pre-ping: the command path's floor).
Local tooling only; never deployed.
"""

from __future__ import annotations

import asyncio

import aiomysql
import functions_framework.aio
import redis.asyncio
from sqlalchemy.engine import make_url
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs.settings import settings

BODY = (
    b'{"id":1,"title":"limit","description":"","status":"CREATED","version":1,'
    b'"created_at":"2026-11-27T10:00:00.123Z","updated_at":"2026-11-27T10:00:00.123Z"}'
)
LIMIT_TABLE = "bench_limit"  # created by the bench in the bench write database
POOL_SIZE = 16  # above the bench's command concurrency (8): no request waits for a connection
_INSERT = f"INSERT INTO {LIMIT_TABLE} (payload) VALUES (%s)"
_PAYLOAD = BODY.decode()  # a str: aiomysql 0.3's escaping of bytes fails with PyMySQL 1.1
_clients: dict[str, object] = {}
_pool_lock = asyncio.Lock()


def _answer(status: int = 200) -> Response:
    return Response(BODY, status, media_type="application/json")


def _redis() -> redis.asyncio.Redis:
    # Made on first use, in the worker's event loop, like the core's client.
    client = _clients.get("redis")
    if client is None:
        client = _clients["redis"] = redis.asyncio.Redis.from_url(settings().redis_url, socket_timeout=1)
    return client  # type: ignore[return-value]


async def _pool() -> aiomysql.Pool:
    pool = _clients.get("mysql")
    if pool is None:
        async with _pool_lock:
            pool = _clients.get("mysql")
            if pool is None:
                url = make_url(settings().write_db_url)
                pool = _clients["mysql"] = await aiomysql.create_pool(
                    host=url.host,
                    port=url.port or 3306,
                    user=url.username,
                    password=url.password or "",
                    db=url.database,
                    autocommit=False,
                    minsize=1,
                    maxsize=POOL_SIZE,
                )
    return pool  # type: ignore[return-value]


@functions_framework.aio.http
async def constant(request: Request) -> Response:
    return _answer()


@functions_framework.aio.http
async def redis_get(request: Request) -> Response:
    await _redis().get("todo:1")
    return _answer()


@functions_framework.aio.http
async def db_commit(request: Request) -> Response:
    if request.url.path == "/healthz":  # the bench's readiness probe must not write
        return _answer()
    async with (await _pool()).acquire() as conn:
        async with conn.cursor() as cur:
            await cur.execute(_INSERT, (_PAYLOAD,))
        await conn.commit()
    return _answer(201)
