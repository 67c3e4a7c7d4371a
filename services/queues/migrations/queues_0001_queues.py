"""Queues and their items.

Revision ID: queues_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "queues_0001"
down_revision = None
branch_labels = ("queues",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queues_queues",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("next_seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("tenant", "name", name="ux_queues_queues_name"),
    )
    op.create_table(
        "queues_items",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("reference", sa.String(256), nullable=True),
        sa.Column("unique_ref", sa.String(256), nullable=True),
        sa.Column("priority", sa.String(8), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("lane", sa.Integer(), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("postpone_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("progress", sa.Text(), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("exception", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("robot", sa.String(63), nullable=True),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("lease", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retry_of", sa.String(32), nullable=True),
        sa.Column("retried_by", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    # get-next: a queue's New items in processing order.
    op.create_index("ix_queues_items_next", "queues_items", ["queue_id", "state", "lane", "rank", "deadline", "seq"])
    op.create_index("ix_queues_items_seq", "queues_items", ["queue_id", "seq"])
    op.create_index("ix_queues_items_holder", "queues_items", ["tenant", "robot", "state"])
    op.create_index("ix_queues_items_job", "queues_items", ["job_id"])
    op.create_index("ix_queues_items_lease", "queues_items", ["state", "lease_expires_at"])
    op.create_index("ix_queues_items_created", "queues_items", ["queue_id", "state", "created_at"])
    # A unique-reference queue holds each reference once (a retry's copy and deleted items do not count).
    op.create_index("ux_queues_items_reference", "queues_items", ["queue_id", "unique_ref"], unique=True)


def downgrade() -> None:
    op.drop_table("queues_items")
    op.drop_table("queues_queues")
