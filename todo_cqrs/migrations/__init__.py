"""Schema migrations: one Alembic history per database (write: todos + outbox; read: todos_view)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from todo_cqrs.db import driver_url
from todo_cqrs.settings import settings

HERE = Path(__file__).resolve().parent


def alembic_config(database: str) -> Config:
    """database: "write" or "read"."""
    url = settings().write_db_url if database == "write" else settings().read_db_url
    url = driver_url(url, "pymysql").render_as_string(hide_password=False)
    config = Config()
    config.set_main_option("script_location", str(HERE / database))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def run_online(context: Any) -> None:
    """The body of both histories' env.py: migrate over one connection to the configured URL."""
    url = context.config.get_main_option("sqlalchemy.url") or ""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


def upgrade(revision: str = "head") -> None:
    """Bring both databases to `revision`."""
    for database in ("write", "read"):
        command.upgrade(alembic_config(database), revision)
