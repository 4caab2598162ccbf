"""The credentials `make run` hands each function (tools/credentials.py, todo_cqrs/roles.py): its role's
DB user and Redis user, nothing for a function without a role, secrets generated 0600 and kept."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from todo_cqrs import roles
from tools import credentials, run
from tools.topology import FUNCTIONS


@pytest.fixture(autouse=True)
def secrets_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(credentials, "SECRETS_DIR", tmp_path / "secrets")
    monkeypatch.delenv("CURSOR_SECRET", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/1")
    return tmp_path / "secrets"


def test_every_function_runs_as_its_role_with_that_roles_db_and_redis_user(secrets_dir: Path) -> None:
    assert {f.name for f in FUNCTIONS} <= set(roles.FUNCTION_ROLES)
    for function in FUNCTIONS:
        role = roles.FUNCTION_ROLES[function.name]
        env = run.function_env(function)
        redis_url = urlsplit(env["REDIS_URL"])
        assert (redis_url.hostname, redis_url.port, redis_url.path) == ("127.0.0.1", 6379, "/1")
        if role is None:
            assert env["DB_PASSWORD"] == "" and env["DB_USER"] not in ("todo", *roles.ROLES)
        else:
            assert (env["DB_USER"], env["DB_PASSWORD"]) == (role, credentials.db_password(role))
        if role in roles.REDIS_RULES:
            assert (redis_url.username, redis_url.password) == (role, credentials.redis_password(role))
        else:
            assert redis_url.username is None and redis_url.password is None
        assert ("CURSOR_SECRET" in env) == (role == roles.QUERY)


def test_roles_get_distinct_generated_passwords_kept_0600(secrets_dir: Path) -> None:
    passwords = {role: credentials.db_password(role) for role in roles.ROLES}
    assert len(set(passwords.values())) == len(roles.ROLES)
    assert {role: credentials.db_password(role) for role in roles.ROLES} == passwords  # kept
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    for path in secrets_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_the_admin_env_is_the_default_redis_user_and_the_todo_db_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DB_PASSWORD", raising=False)
    monkeypatch.delenv("DB_USER", raising=False)
    env = credentials.admin_env()
    assert (env["DB_USER"], env["DB_PASSWORD"]) == ("todo", credentials.secret("db-password"))
    url = urlsplit(env["REDIS_URL"])
    assert (url.username, url.password) == ("default", credentials.redis_admin_password())


def test_the_redis_acl_protects_default_and_gives_the_query_user_no_write_on_floors_or_generation() -> None:
    lines = roles.redis_acl({roles.PROJECTION: "p", roles.QUERY: "q"}, "admin")
    users = {line.split()[1]: line.split()[2:] for line in lines}
    assert users["default"][:2] == ["on", ">admin"]
    assert set(users) == {"default", roles.PROJECTION, roles.QUERY}  # reconcile: no password, no user
    query = users[roles.QUERY]
    assert "%R~todos:floor:*" in query and "%R~todos:list:gen" in query
    assert not {"+hset", "+incr", "+publish", "+del", "+@all"} & set(query)
    with pytest.raises(ValueError):
        roles.redis_acl({}, "")


def test_grants_name_only_tables_the_migrations_make() -> None:
    tables = {("write", t) for t in ("todos", "outbox", "outbox_leases", "idempotency_keys")}
    tables.add(("read", "todos_view"))
    assert {(g.database, g.table) for grants in roles.GRANTS.values() for g in grants} <= tables
    assert roles.privileges(roles.QUERY, "w", "r") == {("r", "todos_view", "SELECT")}
