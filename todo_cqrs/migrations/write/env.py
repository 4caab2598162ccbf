"""Alembic environment: online migrations against the URL the caller configured."""

import sqlalchemy as sa
from alembic import context

url = context.config.get_main_option("sqlalchemy.url") or ""
engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
