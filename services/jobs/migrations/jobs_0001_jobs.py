"""Jobs: what runs where, in which state, and how it ended.

Revision ID: jobs_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0001"
down_revision = None
branch_labels = ("jobs",)
depends_on = None

_ACTIVE = "state IN ('Running', 'Stopping', 'Terminating')"


def upgrade() -> None:
    op.create_table(
        "jobs_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("process", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("package", sa.Text(), nullable=False),
        sa.Column("target_robot", sa.String(63), nullable=True),
        sa.Column("target_group", sa.String(63), nullable=True),
        sa.Column("robot", sa.String(63), nullable=True),
        sa.Column("host", sa.String(63), nullable=True),
        sa.Column("session", sa.String(64), nullable=True),
        sa.Column("priority", sa.String(8), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("input", sa.Text(), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("kill_grace_s", sa.Float(), nullable=False),
        sa.Column("on_robot_lost", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("start_acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    )
    # Robots take Pending jobs by priority, then age.
    op.create_index("ix_jobs_jobs_queue", "jobs_jobs", ["tenant", "state", "rank", "created_at"])
    op.create_index("ix_jobs_jobs_created", "jobs_jobs", ["tenant", "created_at"])
    op.create_index("ix_jobs_jobs_robot", "jobs_jobs", ["tenant", "robot", "state"])
    # A robot holds at most one active job, whichever replica gave it.
    op.create_index(
        "ux_jobs_jobs_robot_active",
        "jobs_jobs",
        ["tenant", "robot"],
        unique=True,
        sqlite_where=sa.text(_ACTIVE),
        postgresql_where=sa.text(_ACTIVE),
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_jobs_robot_active", table_name="jobs_jobs")
    op.drop_index("ix_jobs_jobs_robot", table_name="jobs_jobs")
    op.drop_index("ix_jobs_jobs_created", table_name="jobs_jobs")
    op.drop_index("ix_jobs_jobs_queue", table_name="jobs_jobs")
    op.drop_table("jobs_jobs")
