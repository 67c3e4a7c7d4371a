"""Alembic revisions of the auth service (branch `auth`)."""
