"""Alembic revisions of the jobs service (branch `jobs`)."""
