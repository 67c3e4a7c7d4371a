"""Alembic revisions of the scheduler service (branch `scheduler`)."""
