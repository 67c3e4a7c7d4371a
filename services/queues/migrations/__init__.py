"""Alembic revisions of the queues service (branch `queues`)."""
