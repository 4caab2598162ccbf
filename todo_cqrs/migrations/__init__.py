"""Schema migrations: one Alembic history per database (write: todos + outbox; read: todos_view)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from todo_cqrs.settings import settings

HERE = Path(__file__).resolve().parent


def alembic_config(database: str) -> Config:
    """database: "write" or "read"."""
    url = settings().write_db_url if database == "write" else settings().read_db_url
    config = Config()
    config.set_main_option("script_location", str(HERE / database))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(revision: str = "head") -> None:
    """Bring both databases to `revision`."""
    for database in ("write", "read"):
        command.upgrade(alembic_config(database), revision)
