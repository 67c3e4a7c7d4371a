"""herder's Alembic environment; each service keeps its revisions in its own branch."""
