"""Least privilege on the real MariaDB and Redis (issue 17): each role's credentials, as `make run` hands
them to its functions (tools/credentials.py, grants in todo_cqrs/roles.py), can do what its code needs
and nothing the other roles do.

Every attempt that must fail is made on a row or key of this module's own (a high random id), and each
check first shows that the same statement works with the credentials that are entitled to it, so a
refusal cannot come from a mistyped statement.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pymysql
import pytest
import redis
from sqlalchemy.engine import make_url

from tests.integration.read_model_ids import CREATED, HIGH_IDS, UPDATED, todo_data
from tests.integration.settings_override import Run
from todo_cqrs import bootstrap, roles
from todo_cqrs.adapters.cache import LIST_GENERATION_KEY, VERSIONS_CHANNEL, floor_key, todo_key
from todo_cqrs.projection.handlers import Projection, project_event
from todo_cqrs.query import handlers as query_handlers
from todo_cqrs.query.handlers import Queries
from todo_cqrs.settings import Settings, settings
from tools import credentials, services

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

ACCESS_DENIED = {1044, 1045, 1142, 1143, 1227}  # database, login, table, column, privilege


def connect(role: str | None, database: str | None) -> pymysql.Connection[Any]:
    """A connection as the role (None: the admin) to one of the configured databases (or none), over TCP."""
    url = make_url(settings().write_db_url)
    user, password = (role, credentials.db_password(role)) if role else (url.username, url.password)
    return pymysql.connect(
        host=url.host, port=url.port or 3306, user=user, password=password, database=database, autocommit=True
    )


def databases() -> tuple[str, str]:
    return make_url(settings().write_db_url).database or "", make_url(settings().read_db_url).database or ""


def refused(role: str, database: str, statement: str) -> int:
    """The server's error number when the role runs the statement (it must be refused)."""
    try:
        with connect(role, database) as conn, conn.cursor() as cur:
            cur.execute(statement)
    except (pymysql.err.OperationalError, pymysql.err.ProgrammingError) as exc:
        return int(exc.args[0])
    raise AssertionError(f"{role} was allowed to run {statement!r} on {database}")


def allowed(role: str | None, database: str, statement: str) -> None:
    with connect(role, database) as conn, conn.cursor() as cur:
        cur.execute(statement)


@pytest.fixture
def row_id() -> int:
    return HIGH_IDS + secrets.randbelow(HIGH_IDS)


# --- MariaDB -----------------------------------------------------------------------------------------


def test_get_todos_credentials_only_read_the_read_table(row_id: int) -> None:
    write_db, read_db = databases()
    allowed(roles.QUERY, read_db, f"SELECT id FROM todos_view WHERE id = {row_id}")
    writes = [
        "INSERT INTO todos_view (id, title, description, status, version, created_at, updated_at) "
        f"VALUES ({row_id}, 'x', '', 'CREATED', 1, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3))",
        f"UPDATE todos_view SET version = 2147483647 WHERE id = {row_id}",
        f"DELETE FROM todos_view WHERE id = {row_id}",
        "DROP TABLE todos_view",
        "TRUNCATE TABLE todos_view",
        "CREATE TABLE planted (id INT)",
    ]
    for statement in writes:
        assert refused(roles.QUERY, read_db, statement) in ACCESS_DENIED, statement
    # Nothing of the write DB: neither the database nor its tables by name.
    assert refused(roles.QUERY, read_db, f"SELECT id FROM `{write_db}`.todos LIMIT 1") in ACCESS_DENIED
    assert refused(roles.QUERY, read_db, f"SELECT id FROM `{write_db}`.outbox LIMIT 1") in ACCESS_DENIED
    with pytest.raises(pymysql.err.OperationalError) as no_login:
        connect(roles.QUERY, write_db)
    assert no_login.value.args[0] in ACCESS_DENIED


def test_command_credentials_cannot_touch_the_read_db(row_id: int) -> None:
    write_db, read_db = databases()
    allowed(roles.COMMAND, write_db, f"SELECT id FROM todos WHERE id = {row_id}")
    with pytest.raises(pymysql.err.OperationalError) as no_login:
        connect(roles.COMMAND, read_db)
    assert no_login.value.args[0] in ACCESS_DENIED
    for statement in (
        f"SELECT id FROM `{read_db}`.todos_view LIMIT 1",
        f"UPDATE `{read_db}`.todos_view SET version = 2147483647 WHERE id = {row_id}",
        f"DELETE FROM `{read_db}`.todos_view WHERE id = {row_id}",
    ):
        assert refused(roles.COMMAND, write_db, statement) in ACCESS_DENIED, statement
    # No schema changes on its own database either.
    assert refused(roles.COMMAND, write_db, "DROP TABLE outbox") in ACCESS_DENIED
    assert refused(roles.COMMAND, write_db, "ALTER TABLE todos ADD COLUMN planted INT") in ACCESS_DENIED


def test_relay_credentials_cannot_change_todos_nor_write_outbox_rows(row_id: int) -> None:
    write_db, _ = databases()
    allowed(roles.RELAY, write_db, f"UPDATE outbox SET published_at = published_at WHERE id = {row_id}")
    for statement in (
        f"UPDATE todos SET version = version + 1 WHERE id = {row_id}",
        "INSERT INTO outbox (event_id, event_type, todo_id, version, occurred_at, payload) "
        f"VALUES (UUID(), 'todo.updated.v1', {row_id}, 1, UTC_TIMESTAMP(3), '{{}}')",
        f"DELETE FROM outbox WHERE id = {row_id}",
    ):
        assert refused(roles.RELAY, write_db, statement) in ACCESS_DENIED, statement


def test_projection_credentials_write_only_the_read_table(row_id: int) -> None:
    write_db, read_db = databases()
    allowed(roles.PROJECTION, read_db, f"UPDATE todos_view SET version = version WHERE id = {row_id}")
    assert refused(roles.PROJECTION, read_db, "DROP TABLE todos_view") in ACCESS_DENIED
    assert refused(roles.PROJECTION, read_db, f"DELETE FROM todos_view WHERE id = {row_id}") in ACCESS_DENIED
    with pytest.raises(pymysql.err.OperationalError) as no_login:
        connect(roles.PROJECTION, write_db)
    assert no_login.value.args[0] in ACCESS_DENIED


def test_every_role_account_has_exactly_the_grants_of_todo_cqrs_roles() -> None:
    write_db, read_db = databases()
    for role in roles.ROLES:  # each account sees its own privileges in information_schema
        with connect(role, None) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT TABLE_SCHEMA, TABLE_NAME, PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES "
                "WHERE GRANTEE = %s AND TABLE_SCHEMA IN (%s, %s)",
                (f"'{role}'@'127.0.0.1'", write_db, read_db),
            )
            assert set(cur.fetchall()) == roles.privileges(role, write_db, read_db), role
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.SCHEMA_PRIVILEGES WHERE GRANTEE = %s",
                (f"'{role}'@'127.0.0.1'",),
            )  # nothing database-wide, in any database
            assert cur.fetchone() == (0,), f"{role} holds database-wide privileges"


def test_the_migrations_jobs_grant_command_sets_the_same_accounts_and_grants() -> None:
    """`python -m todo_cqrs.roles grant`, as the cluster's migrations Job runs it after the migrations,
    here as the local server's administrator with the local passwords: it succeeds, and every role
    still logs in and holds exactly its grants."""
    write_db, read_db = databases()
    env = {
        **os.environ,
        "WRITE_DB_URL": services.socket_admin_url(write_db),
        "READ_DB_URL": services.socket_admin_url(read_db),
        "DB_ROLE_HOSTS": ",".join(services.ROLE_HOSTS),
        **{roles.env_name("DB_PASSWORD", role): credentials.db_password(role) for role in roles.ROLES},
    }
    done = subprocess.run(
        [sys.executable, "-m", "todo_cqrs.roles", "grant"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for role in roles.ROLES:
        with connect(role, None) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT TABLE_SCHEMA, TABLE_NAME, PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES "
                "WHERE GRANTEE = %s AND TABLE_SCHEMA IN (%s, %s)",
                (f"'{role}'@'127.0.0.1'", write_db, read_db),
            )
            assert set(cur.fetchall()) == roles.privileges(role, write_db, read_db), role


def test_re_applying_the_roles_takes_back_a_privilege_granted_by_hand() -> None:
    _, read_db = databases()
    admin = pymysql.connect(unix_socket=services.socket_path(), user=services.os_user(), autocommit=True)
    with admin, admin.cursor() as cur:
        cur.execute(f"GRANT DROP ON `{read_db}`.todos_view TO 'todo_query'@'127.0.0.1'")
        cur.execute(f"GRANT SELECT ON `{read_db}`.* TO 'todo_query'@'127.0.0.1'")
    services.ensure_roles()  # as make run, make migrate and the tests do after the migrations
    assert refused(roles.QUERY, read_db, "DROP TABLE todos_view") in ACCESS_DENIED
    assert refused(roles.QUERY, read_db, "SELECT 1 FROM alembic_version") in ACCESS_DENIED


# --- the roles at work: what the projection and get_todos run, with their own credentials -------------


def role_settings(role: str) -> Settings:
    """This process's settings with the role's credentials for both databases and Redis."""
    s, password = settings(), credentials.db_password(role)

    def url(value: str) -> str:
        return make_url(value).set(username=role, password=password).render_as_string(hide_password=False)

    redis_url = credentials.with_user(s.redis_url, role, credentials.redis_password(role))
    return replace(s, write_db_url=url(s.write_db_url), read_db_url=url(s.read_db_url), redis_url=redis_url)


@pytest.fixture
def as_role(run: Run[Any]) -> Iterator[Any]:
    """The projection's and get_todos' dependencies, built by bootstrap as their functions build them,
    with one role's credentials; closed at the end."""
    built: list[Projection | Queries] = []

    def deps(build: Any, role: str) -> Any:
        built.append(build(role_settings(role)))
        return built[-1]

    yield deps
    for made in built:
        run(made.aclose())


def test_the_projection_and_the_query_work_with_their_own_credentials(
    run: Run[Any], new_id: Any, as_role: Any
) -> None:
    todo_id = new_id()
    projection: Projection = as_role(bootstrap.projection, roles.PROJECTION)
    assert run(project_event(projection, CREATED, todo_data(todo_id, 1))) == "applied"
    queries: Queries = as_role(bootstrap.queries, roles.QUERY)
    read = run(query_handlers.get_todo(queries, todo_id))
    assert (read.version, read.cache) == (1, "miss")  # read from the DB, then stored in the cache
    assert run(query_handlers.get_todo(queries, todo_id)).cache == "hit"
    cursor = queries.cursors.encode(todo_id - 1)
    page = run(
        query_handlers.list_todos(
            queries, *query_handlers.page_params({"cursor": cursor, "limit": "1"}, queries.cursors)
        )
    )
    assert b'"id":%d' % todo_id in page.body


def test_a_reconcile_pass_repairs_and_prunes_with_its_own_credentials(
    run: Run[Any], new_id: Any, projection: Projection
) -> None:
    todo_id = new_id()  # a live read row the write DB never assigned: drift the pass removes
    run(project_event(projection, CREATED, todo_data(todo_id, 1)))
    tick = bootstrap.reconcile(replace(role_settings(roles.RECONCILE), reconcile_grace_s=0.0))

    async def one_pass() -> dict[str, Any]:
        try:
            return await tick.run()
        finally:
            await tick.aclose()

    report = run(one_pass())

    assert report["repaired"]["extra"] >= 1 and "outbox_rows_pruned" in report
    _, read_db = databases()
    with connect(None, read_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT deleted FROM todos_view WHERE id = %s", (todo_id,))
        assert cur.fetchone() is None


# --- Redis ---------------------------------------------------------------------------------------------


def redis_admin() -> redis.Redis:
    return redis.Redis.from_url(settings().redis_url, socket_timeout=2)


def redis_as(role: str | None) -> redis.Redis:
    """A client as the role; None: no credentials at all (what a command or the relay gets)."""
    url = settings().redis_url
    if role is None:
        url = credentials.with_user(url, None, None)
    else:
        url = credentials.with_user(url, role, credentials.redis_password(role))
    return redis.Redis.from_url(url, socket_timeout=2)


def test_the_query_user_reads_and_fills_the_cache_but_cannot_write_what_the_projection_writes(
    row_id: int,
) -> None:
    projection, query = redis_as(roles.PROJECTION), redis_as(roles.QUERY)
    with projection, query:
        # The projection's writes, done by the projection's user...
        projection.hset(floor_key(row_id), str(row_id), 1)
        projection.set(todo_key(row_id), b"1:i:", ex=60)
        # ...the query may read and fill the cache...
        assert query.hget(floor_key(row_id), str(row_id)) == b"1"
        query.set(todo_key(row_id), b'1:t:{"id": 1}', ex=60)
        query.get(LIST_GENERATION_KEY)
        # ...but not move a floor, retire the lists, wake readers, nor touch the server.
        for attempt in (
            lambda: query.hset(floor_key(row_id), str(row_id), 2**31 - 1),
            lambda: query.hdel(floor_key(row_id), str(row_id)),
            lambda: query.incr(LIST_GENERATION_KEY),
            lambda: query.delete(LIST_GENERATION_KEY),
            lambda: query.publish(VERSIONS_CHANNEL, f"{row_id}:9:"),
            lambda: query.flushall(),
            lambda: query.config_set("maxmemory", "1mb"),
            lambda: query.keys("*"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
        assert projection.hget(floor_key(row_id), str(row_id)) == b"1"
    with redis_admin() as admin:
        admin.delete(todo_key(row_id))
        admin.hdel(floor_key(row_id), str(row_id))


def test_the_projection_user_may_run_its_scripts_in_a_pipeline(run: Run[Any], row_id: int) -> None:
    """Several invalidations in one round trip: redis-py checks the scripts with SCRIPT EXISTS first."""
    url = credentials.with_user(
        settings().redis_url, roles.PROJECTION, credentials.redis_password(roles.PROJECTION)
    )

    async def invalidate_two() -> None:
        cache = bootstrap.todo_cache(replace(settings(), redis_url=url))
        try:
            await cache.invalidate_many([(row_id, 3, None), (row_id + 1, 3, None)])  # one pipeline
        finally:
            await cache.aclose()

    run(invalidate_two())
    with redis_admin() as admin:
        assert admin.hget(floor_key(row_id), str(row_id)) == b"3"
        assert admin.hget(floor_key(row_id + 1), str(row_id + 1)) == b"3"
        for todo_id in (row_id, row_id + 1):
            admin.delete(todo_key(todo_id))
            admin.hdel(floor_key(todo_id), str(todo_id))


def test_the_query_user_hears_the_projections_notices(row_id: int) -> None:
    with redis_as(roles.QUERY) as query, redis_as(roles.PROJECTION) as projection:
        listener = query.pubsub()
        listener.subscribe(VERSIONS_CHANNEL)
        assert listener.get_message(timeout=2)["type"] == "subscribe"
        notice = f"{row_id}:7:".encode()
        assert projection.publish(VERSIONS_CHANNEL, notice) >= 1
        message = listener.get_message(timeout=2)
        while message is not None and message["data"] != notice:  # others' notices may come first
            message = listener.get_message(timeout=2)
        assert message is not None and message["data"] == notice
        listener.ping()
        listener.close()


def test_functions_without_a_redis_role_cannot_use_redis() -> None:
    with redis_as(None) as anonymous, pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.get(LIST_GENERATION_KEY)


def test_redis_is_bounded_and_evicts_only_keys_with_a_ttl() -> None:
    with redis_admin() as admin:
        config = admin.config_get("maxmemory*")
    assert int(config["maxmemory"]) > 0
    assert config["maxmemory-policy"] == "volatile-lru"


@pytest.fixture
def queries(run: Run[Any]) -> Iterator[Queries]:
    """get_todos' dependencies, as its function builds them."""
    deps = bootstrap.queries(settings())
    yield deps
    run(deps.aclose())


def test_what_may_be_evicted_has_a_ttl_and_what_may_not_has_none(
    run: Run[Any], new_id: Any, projection: Projection, queries: Queries
) -> None:
    todo_id = new_id()
    run(project_event(projection, CREATED, todo_data(todo_id, 1)))
    run(query_handlers.get_todo(queries, todo_id))  # a cached entry
    page = run(query_handlers.list_todos(queries, None, 1, todo_id - 1))
    assert page.cache == "miss"  # stored now
    with redis_admin() as admin:
        assert admin.ttl(todo_key(todo_id)) > 0
        pages = list(admin.scan_iter(match=f"todos:list:*:[*]:{todo_id - 1}:1", count=1000))
        assert pages and all(admin.ttl(key) > 0 for key in pages)
        assert admin.ttl(floor_key(todo_id)) == -1  # -1: no TTL (never evicted under volatile-lru)
        assert admin.ttl(LIST_GENERATION_KEY) == -1


def test_an_evicted_entry_does_not_let_an_older_version_be_cached(
    run: Run[Any], new_id: Any, projection: Projection
) -> None:
    todo_id = new_id()
    run(project_event(projection, CREATED, todo_data(todo_id, 1)))
    run(project_event(projection, UPDATED, todo_data(todo_id, 2)))

    async def store(todo_id: int, version: int, body: bytes) -> None:
        await projection.cache.store_todo(todo_id, version, body)

    with redis_admin() as admin:
        admin.delete(todo_key(todo_id))  # as volatile-lru would: the marker of version 2 is gone
        # A reader that read version 1 before the projection applied version 2 stores it late:
        run(store(todo_id, 1, b'{"version": 1}'))
        assert admin.get(todo_key(todo_id)) is None
        run(store(todo_id, 2, b'{"version": 2}'))
        assert admin.get(todo_key(todo_id)) == b'2:t:{"version": 2}'
