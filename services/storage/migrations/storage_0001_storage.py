"""Storage buckets, their files, uploads in progress with their staged chunks, and objects to remove.

Revision ID: storage_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "storage_0001"
down_revision = None
branch_labels = ("storage",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "storage_buckets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("max_file_bytes", sa.BigInteger(), nullable=False),
        sa.Column("max_bucket_bytes", sa.BigInteger(), nullable=False),
        sa.Column("robot_groups", sa.JSON(), nullable=False),
        sa.Column("robots", sa.JSON(), nullable=False),
        sa.Column("used_bytes", sa.BigInteger(), nullable=False),
        sa.Column("file_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.UniqueConstraint("tenant", "name", name="ux_storage_buckets_name"),
    )
    op.create_table(
        "storage_files",
        sa.Column("bucket_id", sa.String(32), primary_key=True),
        sa.Column("path", sa.String(1024), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=True),
        sa.Column("nuid", sa.String(32), nullable=False),
        sa.Column("chunk_bytes", sa.Integer(), nullable=False),
        sa.Column("chunk_seqs", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=True),
    )
    op.create_table(
        "storage_uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("bucket_id", sa.String(32), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("received", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_storage_uploads_bucket", "storage_uploads", ["bucket_id", "state"])
    op.create_index("ix_storage_uploads_touched", "storage_uploads", ["touched_at"])
    op.create_table(
        "storage_upload_parts",
        sa.Column("upload_id", sa.String(32), primary_key=True),
        sa.Column("start", sa.BigInteger(), primary_key=True),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.Column("nuid", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "storage_orphans",
        sa.Column("nuid", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("object_name", sa.String(1088), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_storage_orphans_since", "storage_orphans", ["since"])


def downgrade() -> None:
    op.drop_index("ix_storage_orphans_since", table_name="storage_orphans")
    op.drop_index("ix_storage_uploads_touched", table_name="storage_uploads")
    op.drop_index("ix_storage_uploads_bucket", table_name="storage_uploads")
    for table in ("storage_orphans", "storage_upload_parts", "storage_uploads", "storage_files", "storage_buckets"):
        op.drop_table(table)
