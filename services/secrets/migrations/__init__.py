"""Alembic revisions of the secrets service (branch `secrets`)."""
