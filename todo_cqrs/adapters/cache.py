"""The Redis cache of the query side, the invalidations the projection performs, and the notices that
wake `?min_version` readers.

The cache never goes back in time. The classic cache-aside race: a reader loads version 1 from the
read DB, the projection commits version 2 and invalidates, then the reader stores version 1. Here an
invalidation does not delete the entry; it writes a marker holding the version it invalidated for,
and a reader may only store a row whose version is at least that marker's (and newer than any entry
already there): a compare-and-set done atomically in a Lua script. Lists use a generation number
instead: an invalidation bumps it, and a reader stores its page under the generation it read
before querying the DB, a key that nobody reads any more once a newer change was invalidated.

Values: b"<version>:t:<json body>" for a cached todo, b"<version>:i:" for an invalidation marker.
The version sits in front of the body, so a hit needs no JSON parsing for its ETag.

Eviction (Redis runs with maxmemory and volatile-lru: only keys with a TTL are evicted). Entries,
markers and list pages have a TTL: losing one costs a miss. What must never be lost has none: each
invalidated version is also kept as the todo's floor in a hash of FLOOR_BUCKET ids
(todos:floor:<id // FLOOR_BUCKET>, field <id>; a few bytes per todo), which a store checks too, so an
evicted marker, or an evicted entry that had replaced it, never lets an older version be cached; and
the list generation, whose loss would bring retired pages back.

Every invalidation also PUBLISHes "<id>:<version>:<traceparent>" on VERSIONS_CHANNEL: get_todos
wakes the readers waiting for that version (VersionWatch) instead of polling the read DB.

What this does not cover: an invalidation that fails because Redis is unreachable comes after its
read-DB commit, so its event is answered 503 and retried. While Redis is down, reads bypass it and see
the read DB; once it answers again, and until the retried event invalidates the entry (the
KafkaSource's next try: 0.5 s to 20 s away), a read may get the older cached version back. Closing
that gap needs a marker written before the commit: one more Redis round trip per event, not made.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.logs import log_event
from todo_cqrs.loop_local import LoopLocal

LIST_GENERATION_KEY = "todos:list:gen"
FLOOR_BUCKET = 100  # ids per floor hash: small enough for Redis's compact (listpack) encoding
VERSIONS_CHANNEL = "todos:versions"
# After a failure, reads skip Redis for this long instead of paying its timeout on every request.
READ_BREAKER_S = 1.0
REDIS_DOWN = (RedisError, OSError, TimeoutError)  # what a Redis that is down, frozen or cut off raises

# Keys a script only reads, and get_todos' Redis user may only read (the floors, the list generation),
# are passed in ARGV: Redis checks a script's declared KEYS for write access (docs/security.md).
_STORE_TODO = """
local incoming = tonumber(ARGV[1])
local floor = redis.call('HGET', ARGV[5], ARGV[4])
if floor and tonumber(floor) > incoming then return 0 end
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, ':', 1, true)
  local version = tonumber(string.sub(current, 1, sep - 1))
  local kind = string.sub(current, sep + 1, sep + 1)
  if kind == 't' and version >= incoming then return 0 end
  if kind == 'i' and version > incoming then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':t:' .. ARGV[2], 'EX', ARGV[3])
return 1
"""

_INVALIDATE = """
local floor = tonumber(ARGV[1])
local current = redis.call('GET', KEYS[1])
if current then
  local held = tonumber(string.sub(current, 1, string.find(current, ':', 1, true) - 1))
  if held > floor then floor = held end
end
local kept = redis.call('HGET', KEYS[3], ARGV[4])
if kept and tonumber(kept) > floor then floor = tonumber(kept) end
redis.call('HSET', KEYS[3], ARGV[4], floor)
redis.call('SET', KEYS[1], floor .. ':i:', 'EX', ARGV[2])
redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ':' .. ARGV[1] .. ':' .. ARGV[5])
return floor
"""

_READ_LIST = """
local generation = redis.call('GET', ARGV[2]) or '0'
return {generation, redis.call('GET', 'todos:list:' .. generation .. ':' .. ARGV[1])}
"""


class CacheUnavailable(Exception):
    """Redis did not answer; readers bypass it, the projection answers 5xx."""


def todo_key(todo_id: int) -> str:
    return f"todo:{todo_id}"


def floor_key(todo_id: int) -> str:
    return f"todos:floor:{todo_id // FLOOR_BUCKET}"


def _invalidation(
    todo_id: int, version: int, traceparent: str | None, ttl_s: int
) -> tuple[list[Any], list[Any]]:
    """The invalidation script's keys and arguments for one change."""
    keys = [todo_key(todo_id), LIST_GENERATION_KEY, floor_key(todo_id)]
    return keys, [version, ttl_s, VERSIONS_CHANNEL, todo_id, traceparent or ""]


def list_key(generation: bytes | str, page: str) -> str:
    generation = generation.decode() if isinstance(generation, bytes) else generation
    return f"todos:list:{generation}:{page}"


@dataclass(frozen=True, slots=True)
class CachedTodo:
    version: int
    body: bytes


class _Batched:
    """GETs asked for in the same turn of the event loop go to Redis as one MGET: under load, one round
    trip and one pass through redis-py's client code serve several requests."""

    def __init__(self, client: aredis.Redis) -> None:
        self._client = client
        self._waiting: dict[str, list[asyncio.Future[bytes | None]]] = {}

    def get(self, key: str) -> asyncio.Future[bytes | None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._send)
        self._waiting.setdefault(key, []).append(future)
        return future

    def _send(self) -> None:
        batch, self._waiting = self._waiting, {}
        asyncio.get_running_loop().create_task(self._fetch(batch))

    async def _fetch(self, batch: dict[str, list[asyncio.Future[bytes | None]]]) -> None:
        keys = list(batch)
        try:
            if len(keys) == 1:
                values: list[Any] = [await self._client.get(keys[0])]
            else:
                values = await self._client.mget(keys)
        except BaseException as exc:  # every waiter gets the failure (CacheUnavailable for them)
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for key, value in zip(keys, values, strict=True):
            for future in batch[key]:
                if not future.done():
                    future.set_result(value)


class _Connection:
    """One event loop's Redis client, its batched GETs and its scripts."""

    def __init__(self, client: aredis.Redis) -> None:
        self.client = client
        self.batched = _Batched(client)
        self.store_todo = client.register_script(_STORE_TODO)
        self.invalidate = client.register_script(_INVALIDATE)
        self.read_list = client.register_script(_READ_LIST)

    async def aclose(self) -> None:
        await self.client.aclose()


class TodoCache:
    """The query side's cache in Redis. `connect` makes a client: once per event loop, on first use (an
    asyncio client never outlives its loop), so nothing connects at construction. tests/contract holds
    the in-memory fake to this class's behaviour."""

    def __init__(self, connect: Callable[[], aredis.Redis], ttl_s: int, list_ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self.list_ttl_s = list_ttl_s
        self._connection = LoopLocal(lambda: _Connection(connect()))
        self._skip_reads_until = 0.0

    @property
    def client(self) -> aredis.Redis:
        """This event loop's Redis client."""
        return self._connection().client

    async def aclose(self) -> None:
        """Close this loop's client, if one was made."""
        connection = self._connection.peek()
        if connection is not None:
            self._connection.forget()
            await connection.aclose()

    def _check_breaker(self) -> None:
        if time.monotonic() < self._skip_reads_until:
            raise CacheUnavailable("redis was unreachable moments ago")

    def _read_failed(self) -> None:
        self._skip_reads_until = time.monotonic() + READ_BREAKER_S

    async def get_todo(self, todo_id: int) -> CachedTodo | None:
        """The cached todo; None when absent or invalidated. Raises CacheUnavailable."""
        self._check_breaker()
        try:
            value = await self._connection().batched.get(todo_key(todo_id))
        except REDIS_DOWN as exc:
            self._read_failed()
            raise CacheUnavailable(str(exc)) from exc
        if not value:
            return None
        version, kind, body = value.split(b":", 2)
        return CachedTodo(int(version), body) if kind == b"t" else None

    async def store_todo(self, todo_id: int, version: int, body: bytes) -> None:
        """Store a row read from the DB unless a newer version was cached or invalidated meanwhile."""
        try:
            await self._connection().store_todo(
                keys=[todo_key(todo_id)], args=[version, body, self.ttl_s, todo_id, floor_key(todo_id)]
            )
        except REDIS_DOWN:
            self._read_failed()  # the answer is already known; a failed store only costs a later miss

    async def get_list(self, page: str) -> tuple[bytes, bytes | None]:
        """(generation, cached page or None). Raises CacheUnavailable."""
        self._check_breaker()
        try:
            generation, body = await self._connection().read_list(args=[page, LIST_GENERATION_KEY])
        except REDIS_DOWN as exc:
            self._read_failed()
            raise CacheUnavailable(str(exc)) from exc
        return generation, body

    async def store_list(self, generation: bytes, page: str, body: bytes) -> None:
        try:
            await self.client.set(list_key(generation, page), body, ex=self.list_ttl_s)
        except REDIS_DOWN:
            self._read_failed()

    async def invalidate(self, todo_id: int, version: int, traceparent: str | None = None) -> None:
        """After a read-DB commit: mark the todo's entry stale up to `version`, retire every cached
        list, and tell the waiting readers."""
        try:
            keys, args = _invalidation(todo_id, version, traceparent, self.ttl_s)
            await self._connection().invalidate(keys=keys, args=args)
        except REDIS_DOWN as exc:
            raise DependencyUnavailable("redis is unreachable", cause=exc) from exc

    async def invalidate_many(self, changes: list[tuple[int, int, str | None]]) -> None:
        """`invalidate` for each (todo id, version, traceparent), in one round trip."""
        if len(changes) == 1:
            await self.invalidate(*changes[0])
            return
        try:
            connection = self._connection()
            async with connection.client.pipeline(transaction=False) as pipe:
                for change in changes:
                    keys, args = _invalidation(*change, self.ttl_s)
                    await connection.invalidate(keys=keys, args=args, client=pipe)
                await pipe.execute()
        except REDIS_DOWN as exc:
            raise DependencyUnavailable("redis is unreachable", cause=exc) from exc

    async def forget_everything(self) -> None:
        """Drop every cached entry except the invalidation markers, and retire every cached list (for a
        rebuild of the read model: a marker keeps a reader from caching a version older than one the
        projection already applied)."""
        try:
            async for key in self.client.scan_iter(match="todo:*", count=1000):
                value = await self.client.get(key)
                if value and b":t:" in value[:24]:
                    await self.client.delete(key)
            await self.client.incr(LIST_GENERATION_KEY)
        except REDIS_DOWN as exc:
            raise DependencyUnavailable("redis is unreachable", cause=exc) from exc


def redis_client(url: str, timeout_s: float | None) -> aredis.Redis:
    # No client-side retries: a frozen Redis must cost one short timeout, not several.
    return aredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s or 1.0,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


# --- waking ?min_version readers --------------------------------------------------------------------


class VersionWatch:
    """This process's subscription to VERSIONS_CHANNEL, and the readers waiting for a version.

    Subscribed only while readers wait (and IDLE_S after the last): a notice costs nothing in a
    get_todos process that nobody asks for read-your-writes. `healthy` is False until subscribed,
    and while the subscription is down or Redis stops answering its pings; readers then poll the
    read DB instead (bounded), as they would without Redis.
    """

    PING_EVERY_S = 1.0
    HEALTHY_WITHIN_S = 2.5
    IDLE_S = 10.0
    SUBSCRIBE_WAIT_S = 0.05

    def __init__(self, connect: Callable[[], aredis.Redis]) -> None:
        """connect: a Redis client without a read timeout (a subscription waits for notices)."""
        self._connect = connect
        self._waiters: dict[int, list[tuple[int, asyncio.Future[str]]]] = {}
        self._last_heard = 0.0
        self._last_waiter = 0.0
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def healthy(self) -> bool:
        return self._subscribed.is_set() and time.monotonic() - self._last_heard < self.HEALTHY_WITHIN_S

    async def ready(self) -> bool:
        """Subscribe if need be (waiting a moment for it); True when notices can be relied on."""
        self._last_waiter = time.monotonic()
        self._ensure_running()
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), self.SUBSCRIBE_WAIT_S)
        return self.healthy

    def wait_for(self, todo_id: int, version: int) -> asyncio.Future[str]:
        """A future that resolves (to the projection's traceparent) once `version` of the todo is applied.
        Register it before reading the read model, so that no notice falls between the two."""
        self._last_waiter = time.monotonic()
        self._ensure_running()
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(todo_id, []).append((version, future))
        return future

    def forget(self, todo_id: int, future: asyncio.Future[str]) -> None:
        waiting = self._waiters.get(todo_id)
        if waiting is not None:
            waiting[:] = [(v, f) for v, f in waiting if f is not future]
            if not waiting:
                del self._waiters[todo_id]

    def notice(self, message: bytes) -> None:
        todo_text, _, rest = message.partition(b":")
        version_text, _, traceparent = rest.partition(b":")
        try:
            todo_id, version = int(todo_text), int(version_text)
        except ValueError:
            return
        waiting = self._waiters.get(todo_id)
        if not waiting:
            return
        still = []
        for wanted, future in waiting:
            if wanted <= version:
                if not future.done():
                    future.set_result(traceparent.decode())
            else:
                still.append((wanted, future))
        if still:
            self._waiters[todo_id] = still
        else:
            del self._waiters[todo_id]

    async def aclose(self) -> None:
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # its subscription, waiters and event belong to one loop
            self._loop, self._task, self._waiters = loop, None, {}
            self._subscribed = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._listen(), name="version-watch")

    async def _listen(self) -> None:
        backoff = 0.1
        while not self._idle():
            client = self._connect()
            pubsub = client.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(VERSIONS_CHANNEL), 1.0)
                backoff = 0.1
                next_ping = 0.0
                while not self._idle():
                    now = time.monotonic()
                    if now >= next_ping:
                        await pubsub.ping()
                        next_ping = now + self.PING_EVERY_S
                    message = await pubsub.get_message(timeout=self.PING_EVERY_S / 2)
                    if message is None:
                        continue
                    self._last_heard = time.monotonic()  # a notice, a pong or the subscription's answer
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                    elif message["type"] == "message":
                        self.notice(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect; readers poll meanwhile
                self._subscribed.clear()
                self._last_heard = 0.0
                log_event("version_watch_down", error=repr(exc)[:200], retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()

    def _idle(self) -> bool:
        return not self._waiters and time.monotonic() - self._last_waiter > self.IDLE_S
