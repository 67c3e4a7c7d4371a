"""Alembic migrations, applied at start-up and by `herder db upgrade`."""

from __future__ import annotations

import os
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from herder.client.errors import SetupError
from herder.services.common import database
from herder.services.common.database import describe_failure

# (package, folder in it) of every branch: Alembic must know them all, or a database
# that has a revision of a branch it does not know cannot be read.
MIGRATION_LOCATIONS = (
    ("herder.services.common.migrations", "versions"),
    ("herder.services.auth.migrations", ""),
    ("herder.services.registry.migrations", ""),
    ("herder.services.packages.migrations", ""),
    ("herder.services.jobs.migrations", ""),
    ("herder.services.queues.migrations", ""),
    ("herder.services.secrets.migrations", ""),
    ("herder.services.storage.migrations", ""),
    ("herder.services.scheduler.migrations", ""),
)
# Serialises concurrent upgrades of one PostgreSQL database by several processes.
_PG_LOCK_KEY = 0x6864_6D69_6772  # "hdmigr"


def alembic_config() -> Config:
    """The Alembic configuration: herder's environment and every service's revisions."""
    config = Config()
    config.set_main_option("script_location", "herder.services.common:migrations")
    locations = [str(resources.files(package).joinpath(folder)) for package, folder in MIGRATION_LOCATIONS]
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", os.pathsep.join(locations))
    return config


def heads() -> set[str]:
    """The newest revision of every branch this code knows."""
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


async def upgrade(engine: AsyncEngine) -> list[str]:
    """Bring the database to the newest revision of every branch; return the revisions now current."""
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(_upgrade)
    except SetupError:
        raise
    except Exception as exc:
        raise SetupError(describe_failure(engine, exc)) from exc


async def current(engine: AsyncEngine) -> set[str]:
    """The revisions the database is at (empty when it was never migrated)."""
    async with database.read(engine) as connection:
        return await connection.run_sync(_current)


def _current(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


def _upgrade(connection: Connection) -> list[str]:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "heads")
    return sorted(_current(connection))
