"""What each function needs, built from one `Settings` value, and nothing else: its dependencies are made
here and passed in; no handler looks one up.

Each `functions/<name>/main.py` calls one of these at import. Nothing connects then: an engine, a Redis
client or a Kafka producer is made on first use, in the event loop that serves the requests, and
`aclose()` closes them (the command-line tools and the tests; a function's process simply ends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from todo_cqrs.settings import Settings

# Each builder imports what it builds, so a function's process imports only what it uses: dead_letter needs
# neither the database packages nor Redis, get_todos no Kafka client.
if TYPE_CHECKING:
    from todo_cqrs.adapters.cache import TodoCache
    from todo_cqrs.command.handlers import Commands
    from todo_cqrs.dead_letter import DeadLetters
    from todo_cqrs.http import SenderCheck
    from todo_cqrs.outbox.relay import RelayTick
    from todo_cqrs.projection.handlers import Projection
    from todo_cqrs.query.handlers import Queries
    from todo_cqrs.reconcile.service import ReconcileTick

# --- commands: create_todo, update_todo, delete_todo, relay_outbox --------------------------------------


def commands(s: Settings) -> Commands:
    """A command function's: the write store, and the publisher of the rows it commits (with a small pool
    of its own, so commands never wait behind publishing for a connection)."""
    from todo_cqrs.adapters.publisher import Kafka
    from todo_cqrs.adapters.write_store import WriteStore
    from todo_cqrs.command.handlers import Commands
    from todo_cqrs.db import Database
    from todo_cqrs.outbox.leases import outbox_database
    from todo_cqrs.outbox.publisher import ProcessPublisher

    store = WriteStore(Database.write(s), s.outbox_shards, s.idempotency_ttl_s)
    return Commands(store, ProcessPublisher(Kafka(s), outbox_database(s), s.publish_timeout_s))


def relay(s: Settings) -> RelayTick:
    """relay_outbox: the relay of orphaned rows (with a small pool of its own), the store whose expired
    keys it purges, the outbox gauges it refreshes at its scrapes, and who may call it."""
    from todo_cqrs.adapters.publisher import Kafka
    from todo_cqrs.adapters.write_store import WriteStore
    from todo_cqrs.db import Database
    from todo_cqrs.outbox.leases import outbox_database
    from todo_cqrs.outbox.relay import GaugeRefresh, Relay, RelayTick

    database = outbox_database(s)
    return RelayTick(
        relay=Relay(database, Kafka(s), s, min_age_s=s.outbox_orphan_s),
        store=WriteStore(Database.write(s), s.outbox_shards, s.idempotency_ttl_s),
        gauges=GaugeRefresh(database),
        identity=sender_check(s),
    )


# --- queries and events: get_todos, project_event, dead_letter, reconcile -------------------------------


def queries(s: Settings) -> Queries:
    """get_todos: the read store behind this process's read slots (the pool's size, and as many waiting),
    the cache, the projection's version notices, and the bounds of a ?min_version wait."""
    from todo_cqrs.adapters.cache import VersionWatch, redis_client
    from todo_cqrs.adapters.read_store import ReadStore
    from todo_cqrs.db import Database
    from todo_cqrs.query.handlers import Cursors, Queries, ReadSlots, Waiters

    return Queries(
        store=ReadStore(Database.read(s)),
        cache=todo_cache(s),
        # No read timeout: a subscription waits for notices (its pings tell a frozen Redis).
        watch=VersionWatch(lambda: redis_client(s.redis_url, None)),
        slots=ReadSlots(2 * s.db_pool_size),
        waiters=Waiters(s.min_version_max_waiters),
        cursors=Cursors(s.cursor_key),
        min_version_wait_s=s.min_version_wait_s,
    )


def todo_cache(s: Settings) -> TodoCache:
    """The query side's Redis cache (and the projection's invalidations of it)."""
    from todo_cqrs.adapters.cache import TodoCache, redis_client

    return TodoCache(lambda: redis_client(s.redis_url, s.redis_timeout_s), s.cache_ttl_s, s.list_cache_ttl_s)


def projection(s: Settings) -> Projection:
    """project_event: the read store's version-gated upserts and the cache's invalidations."""
    from todo_cqrs.adapters.read_store import ReadStore
    from todo_cqrs.db import Database
    from todo_cqrs.projection.handlers import Projection

    return Projection(store=ReadStore(Database.read(s)), cache=todo_cache(s))


def dead_letters(s: Settings) -> DeadLetters:
    """dead_letter: the store DEAD_LETTER_STORE names (a directory, or S3-compatible object storage)."""
    from todo_cqrs.dead_letter import DeadLetters, store_from

    return DeadLetters(store_from(s))


def reconcile(s: Settings) -> ReconcileTick:
    """reconcile: both databases through small pools without the requests' time limits, and the cache
    its repairs invalidate."""
    from todo_cqrs.reconcile.service import ReconcileTick, batch_database

    return ReconcileTick(
        batch_database("write", s.write_db_url),
        batch_database("read", s.read_db_url),
        todo_cache(s),
        grace_s=s.reconcile_grace_s,
        outbox_retention_h=s.outbox_retention_h,
    )


def sender_check(s: Settings) -> Callable[[], SenderCheck]:
    """The event receivers' check of who sent a request (SENDER_IDENTITY), made on the first request
    that needs it (a receiver whose settings contradict answers 500, it does not fail to start)."""
    from todo_cqrs import sender_identity

    return lambda: sender_identity.from_settings(s)
