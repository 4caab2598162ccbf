"""idempotency keys keep a command's outcome and its todo, not an HTTP reply

Revision ID: w0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.mysql import MEDIUMTEXT

revision = "w0004"
down_revision = "w0003"


def upgrade() -> None:
    # A reply stored before is the todo's JSON with 201 (a create) or 200 (an update or a delete, which
    # answer alike): outcome 1 (created) or 2 (updated) renders the same reply again.
    op.alter_column(
        "idempotency_keys",
        "status",
        new_column_name="outcome",
        existing_type=sa.SmallInteger,
        existing_nullable=True,
    )
    op.execute("UPDATE idempotency_keys SET outcome = IF(outcome = 201, 1, 2) WHERE outcome IS NOT NULL")
    op.drop_column("idempotency_keys", "headers")
    op.alter_column(
        "idempotency_keys", "body", new_column_name="todo", existing_type=MEDIUMTEXT, existing_nullable=True
    )


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys")  # the replies' headers are not kept: the keys go
    op.alter_column(
        "idempotency_keys", "todo", new_column_name="body", existing_type=MEDIUMTEXT, existing_nullable=True
    )
    op.add_column("idempotency_keys", sa.Column("headers", sa.Text, nullable=True))
    op.alter_column(
        "idempotency_keys",
        "outcome",
        new_column_name="status",
        existing_type=sa.SmallInteger,
        existing_nullable=True,
    )
