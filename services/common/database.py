"""The one async engine factory, for SQLite (aiosqlite) and PostgreSQL (psycopg).

SQLite is the laptop default: one process, one writer at a time, every transaction serializable.
PostgreSQL is for a data centre: many writers, READ COMMITTED, explicit row locks where
a decision depends on what it reads.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import TypeDecorator

from herder.client.errors import SetupError
from herder.protocol.messages import DatabaseHealth
from herder.services.common import sqlite_inline

SQLITE_BUSY_TIMEOUT_MS = 10_000
# How long a transaction waits for the process's SQLite connection before giving up.
SQLITE_POOL_TIMEOUT_S = 30.0
POSTGRES_POOL_SIZE = 10
CONNECT_TIMEOUT_S = 10

_EXAMPLES = "use sqlite:///PATH/herder.db or postgresql://USER@HOST:5432/DATABASE"


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("herder stores only timezone-aware timestamps")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


def parse_url(url: str) -> URL:
    """Read a database URL and pick herder's async driver for it, or raise `SetupError`."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise SetupError(f"{url!r} is not a database URL; {_EXAMPLES}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise SetupError(f"{url!r} names no database file; {_EXAMPLES}")
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    raise SetupError(f"{backend!r} databases are not supported; {_EXAMPLES}")


def display_url(url: URL | str) -> str:
    """A URL fit to print: the password hidden."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.render_as_string(hide_password=True)


def create_engine(url: str | URL) -> AsyncEngine:
    """An async engine for `url`: SQLite in WAL mode with a busy timeout and foreign keys on,
    or PostgreSQL with a checked connection pool.

    A SQLite engine claims its file for this process until it is disposed: `SetupError` if another
    process has claimed it."""
    parsed = parse_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not path.parent.exists():
            raise SetupError(f"the folder of the SQLite database {str(path)!r} does not exist; create it first")
        # The inline driver blocks the event loop while SQLite's lock is busy, so a second process on
        # the file is refused here, at start, rather than left to freeze the first for seconds.
        claim = sqlite_inline.FileClaim(path)
        claim.acquire()
        try:
            # SQLite has one write lock, and every herder transaction takes it (BEGIN IMMEDIATE). Several
            # connections in one process would queue for it in SQLite's busy handler, which sleeps and
            # polls (1, 2, 5 … 100 ms); one pooled connection hands the lock over the moment it is free.
            # Its calls run on the event loop, without aiosqlite's thread (see `sqlite_inline`).
            engine = create_async_engine(
                parsed,
                async_creator=sqlite_inline.creator(claim, SQLITE_BUSY_TIMEOUT_MS / 1000),
                pool_size=1,
                max_overflow=0,
                pool_timeout=SQLITE_POOL_TIMEOUT_S,
            )
        except BaseException:
            claim.release()
            raise
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        event.listen(engine.sync_engine, "engine_disposed", lambda _engine: claim.release())
        # An engine dropped without a dispose gives its claim back when it is collected.
        weakref.finalize(engine.sync_engine, claim.release)
        return engine
    return create_async_engine(
        parsed,
        pool_size=POSTGRES_POOL_SIZE,
        pool_pre_ping=True,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling runs reads and DDL outside any transaction; turn it
    # off and let `_sqlite_begin` open every transaction (SQLAlchemy's recipe for pysqlite).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # IMMEDIATE takes the write lock up front: transactions are serializable, and a writer waits
    # out the busy timeout instead of failing when another commits between its read and its write.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@asynccontextmanager
async def read(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for reading, whose transaction ends before the block does.

    `engine.connect()` would end it in a task of its own after the block, on a later turn of the
    event loop; until then the connection would keep SQLite's lock (herder's transactions take it
    up front), and another connection of the process could not get it.
    """
    async with engine.connect() as connection:
        try:
            yield connection
        finally:
            await connection.rollback()


def describe_failure(engine: AsyncEngine, exc: BaseException) -> str:
    """One line saying why the database at `engine` could not be used."""
    reason = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return f"cannot use the database {display_url(engine.url)}: {first_line}"


async def check(engine: AsyncEngine) -> DatabaseHealth:
    """Run `SELECT 1` and report how it went."""
    started = time.perf_counter()
    try:
        async with read(engine) as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:
        return DatabaseHealth(ok=False, dialect=engine.dialect.name, error=describe_failure(engine, exc))
    return DatabaseHealth(
        ok=True, dialect=engine.dialect.name, latency_ms=round((time.perf_counter() - started) * 1000, 3)
    )
