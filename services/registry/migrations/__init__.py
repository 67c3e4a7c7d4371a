"""Alembic revisions of the registry service (branch `registry`)."""
