"""The verdicts on durable job requests (`hd.<tenant>.req.jobs`): accepted with their job, or refused with why.

Revision ID: jobs_0004
Revises: jobs_0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0004"
down_revision = "jobs_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs_requests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("message_seq", sa.BigInteger(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("code", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("principal", sa.String(128), nullable=True),
        sa.Column("process", sa.String(64), nullable=True),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    )
    # One verdict per stream message, however often it was delivered.
    op.create_index("ux_jobs_requests_message", "jobs_requests", ["tenant", "message_seq", "published_at"], unique=True)
    op.create_index("ix_jobs_requests_decided", "jobs_requests", ["tenant", "decided_at"])
    op.create_index("ix_jobs_requests_request_id", "jobs_requests", ["tenant", "request_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_requests_request_id", table_name="jobs_requests")
    op.drop_index("ix_jobs_requests_decided", table_name="jobs_requests")
    op.drop_index("ux_jobs_requests_message", table_name="jobs_requests")
    op.drop_table("jobs_requests")
