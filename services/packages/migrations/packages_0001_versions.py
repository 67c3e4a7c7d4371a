"""Process versions: one immutable row per published version, naming its archive by sha256.

Revision ID: packages_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "packages_0001"
down_revision = None
branch_labels = ("packages",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "packages_versions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("process", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("entry_kind", sa.String(16), nullable=False),
        sa.Column("entry_target", sa.String(1024), nullable=False),
        sa.Column("entry_args", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_by", sa.String(128), nullable=True),
        # Versions are immutable: one row per version of a tenant's process, for good.
        sa.UniqueConstraint("tenant", "process", "version", name="uq_packages_versions_version"),
    )


def downgrade() -> None:
    op.drop_table("packages_versions")
