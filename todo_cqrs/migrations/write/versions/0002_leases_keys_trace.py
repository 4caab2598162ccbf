"""outbox shards and their leases, trace context on outbox rows, idempotency keys

Revision ID: w0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.mysql import DATETIME, MEDIUMTEXT

from todo_cqrs.migrations import outbox_shards

revision = "w0002"
down_revision = "w0001"


def upgrade() -> None:
    op.add_column("outbox", sa.Column("shard", sa.SmallInteger, nullable=False, server_default="0"))
    op.add_column("outbox", sa.Column("traceparent", sa.String(55), nullable=True))
    op.add_column("outbox", sa.Column("tracestate", sa.String(512), nullable=True))
    # Rows written before shards existed go where the publishers now look for their todo.
    op.execute(f"UPDATE outbox SET shard = MOD(todo_id, {outbox_shards(op.get_context().config)})")
    op.create_index("ix_outbox_shard_pending", "outbox", ["shard", "published_at", "id"])
    op.create_table(
        "outbox_leases",
        sa.Column("shard", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("expires_at", DATETIME(fsp=3), nullable=False),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key_hash", sa.CHAR(64), primary_key=True),
        sa.Column("fingerprint", sa.CHAR(64), nullable=False),
        sa.Column("status", sa.SmallInteger, nullable=True),
        sa.Column("headers", sa.Text, nullable=True),
        sa.Column("body", MEDIUMTEXT, nullable=True),
        sa.Column("created_at", DATETIME(fsp=3), nullable=False),
        sa.Column("expires_at", DATETIME(fsp=3), nullable=False),
        sa.Index("ix_idempotency_keys_expires", "expires_at"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("outbox_leases")
    op.drop_index("ix_outbox_shard_pending", "outbox")
    op.drop_column("outbox", "tracestate")
    op.drop_column("outbox", "traceparent")
    op.drop_column("outbox", "shard")
