"""an index on the outbox by todo and publication, for a command's look at its todo's pending events

Revision ID: w0003
"""

from alembic import op

revision = "w0003"
down_revision = "w0002"


def upgrade() -> None:
    op.create_index("ix_outbox_todo_pending", "outbox", ["todo_id", "published_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_todo_pending", "outbox")
