"""Alembic revisions of the packages service (branch `packages`)."""
