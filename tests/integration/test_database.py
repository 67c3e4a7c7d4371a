"""The engine factory and the migrations, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, MetaData, text

from herder.client.errors import SetupError
from herder.services.auth import repository
from herder.services.common import database, events, idempotency, migrate
from herder.services.jobs import repository as jobs_repository
from herder.services.jobs import request_log as jobs_request_log
from herder.services.packages import repository as packages_repository
from herder.services.queues import repository as queues_repository
from herder.services.registry import repository as registry_repository
from herder.services.scheduler import repository as scheduler_repository
from herder.services.secrets import repository as secrets_repository
from herder.services.storage import repository as storage_repository


def _metadata() -> MetaData:
    combined = MetaData()
    sources = (
        repository.metadata,
        events.metadata,
        idempotency.metadata,
        packages_repository.metadata,
        registry_repository.metadata,
        jobs_repository.metadata,
        jobs_request_log.metadata,
        queues_repository.metadata,
        secrets_repository.metadata,
        storage_repository.metadata,
        scheduler_repository.metadata,
    )
    for source in sources:
        for table in source.tables.values():
            table.to_metadata(combined)
    return combined


async def test_migrations_build_the_schema_the_code_expects(blank_db_url: str) -> None:
    engine = database.create_engine(blank_db_url)
    try:
        assert await migrate.current(engine) == set()
        revisions = await migrate.upgrade(engine)
        assert (
            set(revisions)
            == migrate.heads()
            == {
                "common_0002",
                "auth_0001",
                "registry_0001",
                "packages_0001",
                "jobs_0004",
                "queues_0002",
                "secrets_0001",
                "storage_0001",
                "scheduler_0002",
            }
        )
        assert await migrate.upgrade(engine) == revisions  # a second run changes nothing

        def differences(connection: Connection) -> list[object]:
            found: list[object] = compare_metadata(MigrationContext.configure(connection), _metadata())
            return found

        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


async def test_concurrent_upgrades_of_one_database_agree(blank_db_url: str) -> None:
    engines = [database.create_engine(blank_db_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate.upgrade(engine) for engine in engines))
        assert all(set(result) == migrate.heads() for result in results)
    finally:
        for engine in engines:
            await engine.dispose()


async def test_health_reports_the_dialect_and_latency(db_url: str) -> None:
    engine = database.create_engine(db_url)
    try:
        health = await database.check(engine)
        assert health.ok and health.latency_ms is not None and health.latency_ms >= 0
        assert health.dialect in ("sqlite", "postgresql")
    finally:
        await engine.dispose()


async def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = database.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await connection.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await connection.execute(text("PRAGMA busy_timeout"))).scalar() == database.SQLITE_BUSY_TIMEOUT_MS
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://root@localhost/herder", "'mysql' databases are not supported"),
        ("sqlite://", "names no database file"),
        ("sqlite:////no/such/folder/herder.db", "does not exist"),
    ],
)
def test_bad_urls_say_what_to_write(url: str, message: str) -> None:
    with pytest.raises(SetupError, match=message) as caught:
        database.create_engine(url)
    assert "\n" not in caught.value.message


async def test_an_unreachable_postgres_is_one_clear_line() -> None:
    engine = database.create_engine("postgresql://postgres:pw@127.0.0.1:1/none")
    try:
        health = await database.check(engine)
        assert not health.ok and health.error is not None
        assert health.error.startswith("cannot use the database postgresql+psycopg://postgres:***@127.0.0.1:1/none")
        assert "pw" not in health.error and "\n" not in health.error
        with pytest.raises(SetupError, match="cannot use the database"):
            await migrate.upgrade(engine)
    finally:
        await engine.dispose()


def test_driverless_urls_get_herders_async_drivers() -> None:
    assert database.parse_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    assert database.parse_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert database.parse_url("postgres://u@h/db").drivername == "postgresql+psycopg"
