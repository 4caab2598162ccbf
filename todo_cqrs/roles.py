"""Least privilege: the database users and Redis ACL users of each role, in one place.

The local services (tools/services.py) and a cluster's migrations Job both apply what is here:

    python -m todo_cqrs.roles grant      # as a MariaDB user allowed to CREATE USER and GRANT
    python -m todo_cqrs.roles redis-acl  # prints a Redis ACL file (users.acl) for the passwords in the env

Passwords come from the environment: DB_PASSWORD_<ROLE> and REDIS_PASSWORD_<ROLE> (role upper-cased,
e.g. DB_PASSWORD_TODO_QUERY), REDIS_PASSWORD for Redis's `default` user (the admin: tests, tools,
rebuild). Each function process then runs with its role's DB_USER/DB_PASSWORD and a REDIS_URL that
carries its role's user and password (FUNCTION_ROLES).

Table-level grants need the tables: apply them after the migrations. They follow a table by its name,
so the rebuild's RENAME swap keeps them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

COMMAND, RELAY, PROJECTION, QUERY, RECONCILE = (
    "todo_command",
    "todo_relay",
    "todo_projection",
    "todo_query",
    "todo_reconcile",
)
ROLES = (COMMAND, RELAY, PROJECTION, QUERY, RECONCILE)

# Which role each function runs as. None: it needs no database and no Redis (dead letters go to S3
# or a directory).
FUNCTION_ROLES: dict[str, str | None] = {
    "create_todo": COMMAND,
    "update_todo": COMMAND,
    "delete_todo": COMMAND,
    "relay_outbox": RELAY,
    "project_event": PROJECTION,
    "get_todos": QUERY,
    "reconcile": RECONCILE,
    "dead_letter": None,
}


@dataclass(frozen=True)
class Grant:
    privileges: str
    database: str  # "write" or "read"
    table: str


_DML = "SELECT, INSERT, UPDATE, DELETE"
# Exactly the statements each role's code runs (todo_cqrs/adapters, command/, projection/, query/).
GRANTS: dict[str, tuple[Grant, ...]] = {
    # Commands change todos, append to the outbox, keep idempotency keys, and publish what they
    # committed in-process (the outbox relay's code: pending rows, published_at, shard leases).
    COMMAND: (
        Grant(_DML, "write", "todos"),
        Grant("SELECT, INSERT, UPDATE", "write", "outbox"),
        Grant("SELECT, INSERT, UPDATE", "write", "outbox_leases"),
        Grant("SELECT, INSERT, UPDATE", "write", "idempotency_keys"),
    ),
    # The scheduled relay: publishes pending outbox rows under the shard leases, deletes expired keys.
    RELAY: (
        Grant("SELECT, UPDATE", "write", "outbox"),
        Grant("SELECT, INSERT, UPDATE", "write", "outbox_leases"),
        Grant("SELECT, DELETE", "write", "idempotency_keys"),
    ),
    # The projection's version-gated upsert (INSERT ... ON DUPLICATE KEY UPDATE) of rows and tombstones.
    PROJECTION: (Grant("SELECT, INSERT, UPDATE", "read", "todos_view"),),
    QUERY: (Grant("SELECT", "read", "todos_view"),),
    # Compares the write model with the read model and repairs the read rows (tombstones, removals);
    # reads recent deletions from the outbox and deletes published rows past OUTBOX_RETENTION_HOURS.
    RECONCILE: (
        Grant("SELECT", "write", "todos"),
        Grant("SELECT, DELETE", "write", "outbox"),
        Grant(_DML, "read", "todos_view"),
    ),
}

# Redis (todo_cqrs/adapters/cache.py): todo:<id> entries and markers, todos:floor:<bucket> version
# floors, todos:list:gen and todos:list:<gen>:<page> pages, the todos:versions channel. %R~ is
# read-only, ~ read and write. Scripts run with their caller's rights (redis.call is checked too); a
# pipeline of scripts first asks SCRIPT EXISTS.
_REDIS_COMMON = "+ping +select +evalsha +script|load +script|exists"
REDIS_RULES: dict[str, str] = {
    # Invalidates: marker, floor, list generation, notice to the waiting readers.
    PROJECTION: (
        "~todo:* ~todos:floor:* ~todos:list:gen &todos:versions "
        f"{_REDIS_COMMON} +get +set +hget +hset +incr +publish"
    ),
    # Reads and fills the cache (never the floors nor the generation), and listens for notices.
    QUERY: (
        "~todo:* %R~todos:floor:* %R~todos:list:gen ~todos:list:[0-9]* &todos:versions "
        f"{_REDIS_COMMON} +get +mget +set +hget +subscribe +unsubscribe"
    ),
}
REDIS_RULES[RECONCILE] = REDIS_RULES[PROJECTION]  # repairs invalidate as the projection does


def env_name(prefix: str, role: str) -> str:
    return f"{prefix}_{role.upper()}"


def _quote(identifier: str) -> str:
    if not identifier.replace("_", "").isalnum():
        raise ValueError(f"not a plain identifier: {identifier!r}")
    return f"`{identifier}`"


Statement = tuple[str, tuple[str, ...]]


def privileges(role: str, write_db: str, read_db: str) -> set[tuple[str, str, str]]:
    """The role's table privileges on these databases: {(database, table, privilege)}."""
    databases = {"write": write_db, "read": read_db}
    return {
        (databases[g.database], g.table, privilege.strip())
        for g in GRANTS[role]
        for privilege in g.privileges.split(",")
    }


def grant_statements(role: str, host: str, write_db: str, read_db: str) -> list[Statement]:
    """(statement, parameters) that give the account (user@host, which must exist) its role's grants."""
    databases = {"write": write_db, "read": read_db}
    return [
        (f"GRANT {g.privileges} ON {_quote(databases[g.database])}.{_quote(g.table)} TO %s@%s", (role, host))
        for g in GRANTS[role]
    ]


def apply(cursor: Any, role: str, host: str, password: str, write_db: str, read_db: str) -> None:
    """On a DB-API cursor of a user allowed to CREATE USER and GRANT (and to read the grants in
    information_schema): the account with this password and exactly its role's grants on these two
    databases. What it held beyond them there is revoked, without a moment in which a running function
    would lack what it needs; other databases (the bench's) are left alone. Safe to repeat."""
    for statement, params in [
        *account_statements(role, host, password),
        *grant_statements(role, host, write_db, read_db),
    ]:
        cursor.execute(statement, params)
    grantee = f"'{role}'@'{host}'"
    cursor.execute(
        "SELECT TABLE_SCHEMA, TABLE_NAME, PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES "
        "WHERE GRANTEE = %s AND TABLE_SCHEMA IN (%s, %s)",
        (grantee, write_db, read_db),
    )
    for database, table, privilege in set(cursor.fetchall()) - privileges(role, write_db, read_db):
        cursor.execute(f"REVOKE {privilege} ON {_quote(database)}.{_quote(table)} FROM %s@%s", (role, host))
    cursor.execute(
        "SELECT DISTINCT TABLE_SCHEMA FROM information_schema.SCHEMA_PRIVILEGES "
        "WHERE GRANTEE = %s AND TABLE_SCHEMA IN (%s, %s)",
        (grantee, write_db, read_db),
    )
    for (database,) in cursor.fetchall():  # no role holds anything database-wide
        cursor.execute(f"REVOKE ALL PRIVILEGES ON {_quote(database)}.* FROM %s@%s", (role, host))


def account_statements(role: str, host: str, password: str) -> list[Statement]:
    """Create the account if missing and set its password (the secret may have changed)."""
    account = (role, host)
    return [
        ("CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (*account, password)),
        ("ALTER USER %s@%s IDENTIFIED BY %s", (*account, password)),
    ]


def redis_acl(passwords: Mapping[str, str], admin_password: str) -> list[str]:
    """The lines of a Redis ACL file: `default` (the admin) protected by a password, one user per
    role that has Redis rules. Roles without a password are left out."""
    if not admin_password:
        raise ValueError("the Redis admin (default user) needs a password")
    lines = [f"user default on >{admin_password} ~* &* +@all"]
    for role, rules in REDIS_RULES.items():
        if passwords.get(role):
            lines.append(f"user {role} on >{passwords[role]} resetchannels -@all {rules}")
    return lines


def _passwords(prefix: str, roles: Iterable[str]) -> dict[str, str]:
    found = {role: os.environ.get(env_name(prefix, role), "") for role in roles}
    if missing := [env_name(prefix, role) for role, password in found.items() if not password]:
        sys.exit(f"missing passwords: {', '.join(missing)}")
    return found


def _grant_from_env() -> None:
    """Create or update every role's account and grants, connecting as the migrations do (WRITE_DB_URL
    or DB_*), with DB_ROLE_HOSTS (comma-separated, default %) as the accounts' hosts."""
    import sqlalchemy as sa

    from todo_cqrs.db import driver_url
    from todo_cqrs.settings import settings

    s = settings()
    write, read = sa.engine.make_url(s.write_db_url), sa.engine.make_url(s.read_db_url)
    passwords = _passwords("DB_PASSWORD", ROLES)
    hosts = [h.strip() for h in os.environ.get("DB_ROLE_HOSTS", "%").split(",") if h.strip()]
    engine = sa.create_engine(driver_url(s.write_db_url, "pymysql"), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        cursor = conn.connection.cursor()
        for role in ROLES:
            for host in hosts:
                apply(cursor, role, host, passwords[role], write.database or "", read.database or "")
        conn.commit()
    print(f"granted {', '.join(ROLES)} on {write.database} and {read.database} for hosts {', '.join(hosts)}")


if __name__ == "__main__":
    verb = sys.argv[1] if len(sys.argv) > 1 else ""
    if verb == "grant":
        _grant_from_env()
    elif verb == "redis-acl":
        admin = os.environ.get("REDIS_PASSWORD", "")
        print("\n".join(redis_acl(_passwords("REDIS_PASSWORD", REDIS_RULES), admin)))
    else:
        sys.exit("usage: python -m todo_cqrs.roles grant | redis-acl")
