"""The Redis cache of the query side, and the invalidations the projection performs.

The cache never goes back in time. The classic cache-aside race: a reader loads version 1 from the
read DB, the projection commits version 2 and invalidates, then the reader stores version 1. Here an
invalidation does not delete the entry; it writes a marker holding the version it invalidated for,
and a reader may only store a row whose version is at least that marker's (and newer than any entry
already there): a compare-and-set done atomically in a Lua script. Lists use a generation number
instead: an invalidation bumps it, and a reader stores its page under the generation it read
before querying the DB, a key that nobody reads any more once a newer change was invalidated.

Values: b"<version>:t:<json body>" for a cached todo, b"<version>:i:" for an invalidation marker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import cache

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.settings import settings

LIST_GENERATION_KEY = "todos:list:gen"
# After a failure, reads skip Redis for this long instead of paying its timeout on every request.
READ_BREAKER_S = 1.0

_STORE_TODO = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, ':', 1, true)
  local version = tonumber(string.sub(current, 1, sep - 1))
  local kind = string.sub(current, sep + 1, sep + 1)
  local incoming = tonumber(ARGV[1])
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
redis.call('SET', KEYS[1], floor .. ':i:', 'EX', ARGV[2])
redis.call('INCR', KEYS[2])
return floor
"""

_READ_LIST = """
local generation = redis.call('GET', KEYS[1]) or '0'
return {generation, redis.call('GET', 'todos:list:' .. generation .. ':' .. ARGV[1])}
"""


class CacheUnavailable(Exception):
    """Redis did not answer; readers bypass it, the projection answers 5xx."""


def todo_key(todo_id: int) -> str:
    return f"todo:{todo_id}"


def list_key(generation: bytes | str, page: str) -> str:
    generation = generation.decode() if isinstance(generation, bytes) else generation
    return f"todos:list:{generation}:{page}"


@dataclass(frozen=True)
class CachedTodo:
    version: int
    body: bytes


class TodoCache:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._store_todo = client.register_script(_STORE_TODO)
        self._invalidate = client.register_script(_INVALIDATE)
        self._read_list = client.register_script(_READ_LIST)
        self._skip_reads_until = 0.0
        self._lock = threading.Lock()

    def _reads_allowed(self) -> bool:
        return time.monotonic() >= self._skip_reads_until

    def _read_failed(self) -> None:
        with self._lock:
            self._skip_reads_until = time.monotonic() + READ_BREAKER_S

    def get_todo(self, todo_id: int) -> CachedTodo | None:
        """The cached todo; None when absent or invalidated. Raises CacheUnavailable."""
        if not self._reads_allowed():
            raise CacheUnavailable("redis was unreachable moments ago")
        try:
            value = self._redis.get(todo_key(todo_id))
        except redis.RedisError as exc:
            self._read_failed()
            raise CacheUnavailable(str(exc)) from exc
        if not value:
            return None
        version, kind, body = (value if isinstance(value, bytes) else value.encode()).split(b":", 2)
        return CachedTodo(int(version), body) if kind == b"t" else None

    def store_todo(self, todo_id: int, version: int, body: bytes) -> None:
        """Store a row read from the DB unless a newer version was cached or invalidated meanwhile."""
        try:
            self._store_todo(keys=[todo_key(todo_id)], args=[version, body, settings().cache_ttl_s])
        except redis.RedisError:
            self._read_failed()  # the answer is already known; a failed store only costs a later miss

    def get_list(self, page: str) -> tuple[bytes, bytes | None]:
        """(generation, cached page or None). Raises CacheUnavailable."""
        if not self._reads_allowed():
            raise CacheUnavailable("redis was unreachable moments ago")
        try:
            generation, body = self._read_list(keys=[LIST_GENERATION_KEY], args=[page])
        except redis.RedisError as exc:
            self._read_failed()
            raise CacheUnavailable(str(exc)) from exc
        return generation, body

    def store_list(self, generation: bytes, page: str, body: bytes) -> None:
        try:
            self._redis.set(list_key(generation, page), body, ex=settings().list_cache_ttl_s)
        except redis.RedisError:
            self._read_failed()

    def invalidate(self, todo_id: int, version: int) -> None:
        """After a read-DB commit: mark the todo's entry stale up to `version`, retire every cached list."""
        try:
            self._invalidate(
                keys=[todo_key(todo_id), LIST_GENERATION_KEY], args=[version, settings().cache_ttl_s]
            )
        except redis.RedisError as exc:
            raise DependencyUnavailable("redis is unreachable", cause=exc) from exc

    def forget_everything(self) -> None:
        """Drop every cached todo and retire every cached list (for a rebuild of the read model)."""
        try:
            for key in self._redis.scan_iter(match="todo:*", count=1000):
                self._redis.delete(key)
            self._redis.incr(LIST_GENERATION_KEY)
        except redis.RedisError as exc:
            raise DependencyUnavailable("redis is unreachable", cause=exc) from exc


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    # No client-side retries: a frozen Redis must cost one short timeout, not several.
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


@cache
def todo_cache() -> TodoCache:
    s = settings()
    return TodoCache(redis_client(s.redis_url, s.redis_timeout_s))
