"""Alembic revisions of the storage service (branch `storage`)."""
