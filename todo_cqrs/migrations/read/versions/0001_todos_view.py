"""todos_view: the projected todos, with tombstones

Revision ID: r0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.mysql import DATETIME

revision = "r0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "todos_view",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("description", sa.String(2000), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", DATETIME(fsp=3), nullable=False),
        sa.Column("updated_at", DATETIME(fsp=3), nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_todos_view_live_id", "todos_view", ["deleted", "id"])
    op.create_index("ix_todos_view_live_status_id", "todos_view", ["deleted", "status", "id"])


def downgrade() -> None:
    op.drop_table("todos_view")
