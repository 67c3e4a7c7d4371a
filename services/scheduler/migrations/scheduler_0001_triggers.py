"""Triggers and their fires.

Revision ID: scheduler_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "scheduler_0001"
down_revision = None
branch_labels = ("scheduler",)
depends_on = None

_UNFINISHED = sa.text("job_id IS NULL AND skipped IS NULL")


def upgrade() -> None:
    op.create_table(
        "scheduler_triggers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("schedule", sa.Text(), nullable=True),
        sa.Column("queue_rule", sa.Text(), nullable=True),
        sa.Column("queue_name", sa.String(128), nullable=True),
        sa.Column("calendar", sa.String(128), nullable=True),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("month", sa.String(7), nullable=True),
        sa.Column("month_runs", sa.Integer(), nullable=False),
        sa.Column("considered_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_fire", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("tenant", "name", name="ux_scheduler_triggers_name"),
    )
    op.create_index("ix_scheduler_triggers_queue", "scheduler_triggers", ["tenant", "queue_name"])
    op.create_table(
        "scheduler_fires",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("trigger_id", sa.String(32), nullable=False),
        sa.Column("trigger_name", sa.String(63), nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cause", sa.String(16), nullable=False),
        sa.Column("claimed_by", sa.String(32), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("skipped", sa.Text(), nullable=True),
        sa.UniqueConstraint("trigger_id", "scheduled_at", name="ux_scheduler_fires_time"),
    )
    op.create_index("ix_scheduler_fires_recent", "scheduler_fires", ["trigger_id", "claimed_at"])
    op.create_index(
        "ix_scheduler_fires_unfinished",
        "scheduler_fires",
        ["claimed_at"],
        sqlite_where=_UNFINISHED,
        postgresql_where=_UNFINISHED,
    )


def downgrade() -> None:
    op.drop_table("scheduler_fires")
    op.drop_table("scheduler_triggers")
