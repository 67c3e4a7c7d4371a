"""Assets and credentials, their values per scope, and robots' sealing keys.

Revision ID: secrets_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "secrets_0001"
down_revision = None
branch_labels = ("secrets",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secrets_assets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("robots_may_write", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.UniqueConstraint("tenant", "name", name="ux_secrets_assets_name"),
    )
    op.create_table(
        "secrets_asset_values",
        sa.Column("asset_id", sa.String(32), primary_key=True),
        sa.Column("scope_kind", sa.String(8), primary_key=True),
        sa.Column("scope_name", sa.String(63), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=True),
    )
    op.create_table(
        "secrets_credentials",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("robots_may_write", sa.Boolean(), nullable=False),
        sa.Column("processes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.UniqueConstraint("tenant", "name", name="ux_secrets_credentials_name"),
    )
    op.create_table(
        "secrets_credential_values",
        sa.Column("credential_id", sa.String(32), primary_key=True),
        sa.Column("scope_kind", sa.String(8), primary_key=True),
        sa.Column("scope_name", sa.String(63), primary_key=True),
        sa.Column("username", sa.String(256), nullable=False),
        sa.Column("expires_on", sa.Date(), nullable=True),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=True),
    )
    op.create_table(
        "secrets_robot_keys",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("robot", sa.String(63), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "secrets_robot_keys",
        "secrets_credential_values",
        "secrets_credentials",
        "secrets_asset_values",
        "secrets_assets",
    ):
        op.drop_table(table)
