"""`make sql DB=read|write`: the `mariadb` client on the local read or write database, as the admin.

The password never appears on a command line (where `ps` shows it): it goes into a defaults file
under .local/secrets (mode 0600, rewritten on each use) that the client reads with
--defaults-extra-file. Statements come from stdin when it is not a terminal:

    echo 'SELECT COUNT(*) FROM todos_view' | make sql DB=read
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from todo_cqrs.settings import LOCAL_DIR, settings

DEFAULTS_FILE = LOCAL_DIR / "secrets" / "mariadb-admin.cnf"


def _option(value: str) -> str:
    """A value of an option file, quoted (a generated password may hold any character)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_defaults(path: Path, user: str, password: str, host: str, port: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(
            "[client]\n"
            f"user={_option(user)}\npassword={_option(password)}\nhost={_option(host)}\nport={port}\n"
        )


def main(argv: list[str]) -> None:
    which = argv[0] if argv else "write"
    if which not in ("read", "write"):
        sys.exit(f"usage: make sql DB=read|write (not {which!r})")
    url = make_url(settings().read_db_url if which == "read" else settings().write_db_url)
    client = shutil.which("mariadb") or shutil.which("mysql")
    if client is None:
        sys.exit("the mariadb client is not installed (apt-get install mariadb-client)")
    write_defaults(
        DEFAULTS_FILE, url.username or "", url.password or "", url.host or "127.0.0.1", url.port or 3306
    )
    options = [
        f"--defaults-extra-file={DEFAULTS_FILE}",
        "--default-character-set=utf8mb4",
        url.database or "",
    ]
    os.execv(client, [client, *options])


if __name__ == "__main__":
    main(sys.argv[1:])
