"""Jobs remember the trigger or job that started them, and when a "stop after" duration soft-stops them.

Revision ID: jobs_0003
Revises: jobs_0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0003"
down_revision = "jobs_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs_jobs") as batch:
        batch.add_column(sa.Column("stop_after_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("stop_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("trigger", sa.String(63), nullable=True))
        batch.add_column(sa.Column("parent_job", sa.String(32), nullable=True))
    # A trigger's open jobs are counted at each of its fires; a job's children are listed by parent;
    # the sweep looks for jobs past their stop-after moment.
    op.create_index("ix_jobs_jobs_trigger", "jobs_jobs", ["tenant", "trigger", "state"])
    op.create_index("ix_jobs_jobs_parent", "jobs_jobs", ["parent_job"])
    op.create_index("ix_jobs_jobs_stop_at", "jobs_jobs", ["stop_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_jobs_stop_at", table_name="jobs_jobs")
    op.drop_index("ix_jobs_jobs_parent", table_name="jobs_jobs")
    op.drop_index("ix_jobs_jobs_trigger", table_name="jobs_jobs")
    with op.batch_alter_table("jobs_jobs") as batch:
        batch.drop_column("parent_job")
        batch.drop_column("trigger")
        batch.drop_column("stop_at")
        batch.drop_column("stop_after_s")
