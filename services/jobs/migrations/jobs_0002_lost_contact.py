"""Jobs remember when herder lost contact with their robot, and how long a re-queued one waits for it.

Revision ID: jobs_0002
Revises: jobs_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0002"
down_revision = "jobs_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs_jobs") as batch:
        batch.add_column(sa.Column("lost_after_s", sa.Float(), nullable=False, server_default="600"))
        batch.add_column(sa.Column("lost_at", sa.DateTime(timezone=True), nullable=True))
    # The sweep looks for re-queued jobs whose robot has been gone long enough.
    op.create_index("ix_jobs_jobs_lost", "jobs_jobs", ["lost_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_jobs_lost", table_name="jobs_jobs")
    with op.batch_alter_table("jobs_jobs") as batch:
        batch.drop_column("lost_at")
        batch.drop_column("lost_after_s")
