"""Schema migrations: one Alembic history per database (write: todos + outbox; read: todos_view).

The migrations read no settings: what they need (the URL, the outbox's shard count) is put in their
Alembic config by the caller, `alembic_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from todo_cqrs.db import driver_url
from todo_cqrs.settings import Settings, settings

HERE = Path(__file__).resolve().parent


def alembic_config(database: str, cfg: Settings) -> Config:
    """The Alembic config of `database` ("write" or "read") with cfg's URL and outbox shard count."""
    url = cfg.write_db_url if database == "write" else cfg.read_db_url
    url = driver_url(url, "pymysql").render_as_string(hide_password=False)
    config = Config()
    config.set_main_option("script_location", str(HERE / database))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.set_main_option("outbox_shards", str(cfg.outbox_shards))
    return config


def outbox_shards(config: Config | None) -> int:
    """For a migration: the shard count its caller put in the config (`alembic_config`)."""
    value = config.get_main_option("outbox_shards") if config is not None else None
    if not value:
        raise RuntimeError("run the migrations through todo_cqrs.migrations: the config lacks outbox_shards")
    return int(value)


def run_online(context: Any) -> None:
    """The body of both histories' env.py: migrate over one connection to the configured URL."""
    url = context.config.get_main_option("sqlalchemy.url") or ""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


def upgrade(revision: str = "head", cfg: Settings | None = None) -> None:
    """Bring both databases of cfg (default: this process's settings) to `revision`."""
    for database in ("write", "read"):
        command.upgrade(alembic_config(database, cfg or settings()), revision)
