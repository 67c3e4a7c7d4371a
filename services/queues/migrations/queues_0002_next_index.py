"""The index robots take items by holds New items only.

Revision ID: queues_0002
Revises: queues_0001

It held every item of a queue, ended ones too, and shared its leading columns with the
index by creation time; PostgreSQL, with statistics taken before a large batch of items was
added, could pick that one and sort every New item of the queue at each take. Kept to New items,
the index is small, and the one a take is cheapest by.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "queues_0002"
down_revision = "queues_0001"
branch_labels = None
depends_on = None

_NEW = sa.text("state = 'New'")


def upgrade() -> None:
    op.drop_index("ix_queues_items_next", table_name="queues_items")
    op.create_index(
        "ix_queues_items_next",
        "queues_items",
        ["queue_id", "lane", "rank", "deadline", "seq"],
        postgresql_where=_NEW,
        sqlite_where=_NEW,
    )


def downgrade() -> None:
    op.drop_index("ix_queues_items_next", table_name="queues_items")
    op.create_index("ix_queues_items_next", "queues_items", ["queue_id", "state", "lane", "rank", "deadline", "seq"])
