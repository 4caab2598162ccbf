"""The local system's secrets and the environment each process gets from them (the product reads none
of these files: it takes DB_PASSWORD, REDIS_URL and CURSOR_SECRET from its environment, as in a cluster).

Generated on first use under <TODO_LOCAL_DIR>/secrets/ (mode 0600, directory 0700):
  db-password                   the admin user `todo` (migrations, rebuild, tests, tools)
  db-password-<role>            each role's MariaDB user (todo_cqrs/roles.py)
  redis-password                Redis's `default` user, the admin
  redis-password-<role>         each role's Redis ACL user
  cursor-secret                 get_todos' HMAC key for next_cursor

    python -m tools.credentials -- <command ...>   runs a command as the admin (DB_PASSWORD, REDIS_URL set)
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from todo_cqrs import roles
from todo_cqrs.settings import LOCAL_DIR, settings

SECRETS_DIR = LOCAL_DIR / "secrets"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def secret(name: str) -> str:
    """The secret in SECRETS_DIR/name, generated (0600) the first time; safe against a concurrent creator."""
    path = SECRETS_DIR / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    SECRETS_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def secret_path(name: str) -> Path:
    return SECRETS_DIR / name


def admin_db_password() -> str:
    """The admin's password: DB_PASSWORD when the caller set one, else the generated one."""
    return os.environ.get("DB_PASSWORD") or secret("db-password")


def db_password(role: str) -> str:
    return secret(f"db-password-{role}")


def redis_admin_password() -> str:
    return secret("redis-password")


def redis_password(role: str) -> str:
    return secret(f"redis-password-{role}")


def cursor_secret() -> str:
    return os.environ.get("CURSOR_SECRET") or secret("cursor-secret")


def with_user(url: str, user: str | None, password: str | None) -> str:
    """The Redis URL with these credentials (or none), host, port and db kept."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{host}:{parts.port}" if parts.port else host
    if user is not None:
        netloc = f"{quote(user, safe='')}:{quote(password or '', safe='')}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _redis_url() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def admin_env() -> dict[str, str]:
    """The admin's DB password and Redis URL (the configured Redis, as `default` with its password)."""
    return {
        "DB_USER": os.environ.get("DB_USER", "todo"),
        "DB_PASSWORD": admin_db_password(),
        "REDIS_URL": with_user(_redis_url(), "default", redis_admin_password()),
    }


def use_admin() -> None:
    """Give this process (and the children it starts) the admin's credentials, then re-read settings."""
    os.environ.update(admin_env())
    settings.cache_clear()


def function_env(function: str) -> dict[str, str]:
    """A function process's credentials: its role's DB user and Redis user (todo_cqrs/roles.py), none
    for a function without a role, and get_todos' cursor key."""
    role = roles.FUNCTION_ROLES.get(function)
    env = {"DB_USER": role or "nobody", "DB_PASSWORD": db_password(role) if role else ""}
    if role in roles.REDIS_RULES:
        env["REDIS_URL"] = with_user(_redis_url(), role, redis_password(role))
    else:  # no Redis user: every command would answer NOAUTH
        env["REDIS_URL"] = with_user(_redis_url(), None, None)
    if role == roles.QUERY:
        env["CURSOR_SECRET"] = cursor_secret()
    return env


def main(argv: list[str]) -> int:
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print("usage: python -m tools.credentials -- <command ...>", file=sys.stderr)
        return 2
    use_admin()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
