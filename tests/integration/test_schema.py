"""One schema: the SQLAlchemy tables (todo_cqrs/adapters/write_store.py, read_store.py) are its source.
The databases the migrations made (the `services` fixture runs them) must match those tables exactly:
Alembic's autogenerate comparison (what `alembic check` runs) finds no difference, types and server
defaults included.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from todo_cqrs.adapters import read_store, write_store
from todo_cqrs.migrations import alembic_config
from todo_cqrs.projection import rebuild
from todo_cqrs.settings import settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("services")]

METADATA = {"write": write_store.metadata, "read": read_store.metadata}
# A rebuild's working tables (`CREATE TABLE ... LIKE todos_view`): one may outlive a rebuild that died.
REBUILD_TABLES = {rebuild.SHADOW, rebuild.RETIRED}


def part_of_the_schema(name: str | None, type_: str, parent_names: Any) -> bool:
    return not (type_ == "table" and name in REBUILD_TABLES)


def stored_default(text: str | None) -> str | None:
    """A column default as MariaDB reports it: quotes off, a boolean as 0 or 1, NULL as none."""
    if text is None or text.upper() == "NULL":
        return None
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    return {"false": "0", "true": "1"}.get(text.lower(), text)


def server_defaults_differ(
    context: Any,
    inspected_column: Any,
    metadata_column: Any,
    inspected: str | None,
    _: Any,
    rendered: str | None,
) -> bool:
    """Alembic's own comparison takes MariaDB's `''` for a different default than the table's `""`,
    and `0` for a different one than `false`: compare the values instead."""
    return stored_default(inspected) != stored_default(rendered)


@pytest.mark.parametrize("database", ["write", "read"])
def test_migrated_database_matches_the_sqlalchemy_tables(database: str) -> None:
    config = alembic_config(database, settings())
    head = ScriptDirectory.from_config(config).get_heads()
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "compare_server_default": server_defaults_differ,
                    "include_name": part_of_the_schema,
                },
            )
            current = context.get_current_heads()
            differences = compare_metadata(context, METADATA[database])
    finally:
        engine.dispose()

    assert list(current) == head, "the test database is not at the migrations' head"
    assert differences == [], f"the {database} database differs from the SQLAlchemy tables"
