"""Mail triggers keep their mailbox rule.

Revision ID: scheduler_0002
Revises: scheduler_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "scheduler_0002"
down_revision = "scheduler_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scheduler_triggers") as batch:
        batch.add_column(sa.Column("mail_rule", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scheduler_triggers") as batch:
        batch.drop_column("mail_rule")
