"""`python -m todo_cqrs.migrations upgrade|current|history [write|read]`."""

import sys

from alembic import command

from todo_cqrs.migrations import alembic_config, upgrade
from todo_cqrs.settings import settings

USAGE = "usage: python -m todo_cqrs.migrations upgrade | current [write|read] | history [write|read]"

if __name__ == "__main__":
    verb = sys.argv[1] if len(sys.argv) > 1 else "upgrade"
    databases = sys.argv[2:] or ["write", "read"]
    if verb == "upgrade":
        upgrade()
    elif verb in ("current", "history"):
        for database in databases:
            getattr(command, verb)(alembic_config(database, settings()))
    else:
        sys.exit(USAGE)
