"""Helpers the tests share: waiting on conditions, and the real servers they talk to."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar, cast, overload

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy.engine import make_url

from herder.client.connection import Credentials, connect

T = TypeVar("T")

POSTGRES_URL = os.environ.get("HERDER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@overload
async def eventually(check: Callable[[], Awaitable[T | None]], *, timeout: float = ..., interval: float = ...) -> T: ...


@overload
async def eventually(check: Callable[[], T | None], *, timeout: float = ..., interval: float = ...) -> T: ...


async def eventually(
    check: Callable[[], Awaitable[T | None]] | Callable[[], T | None], *, timeout: float = 5.0, interval: float = 0.02
) -> T:
    """Call `check` (a function, or a coroutine function) until it returns something truthy without
    raising; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return cast(T, result)
            last = None
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s") from last
        await asyncio.sleep(interval)


async def connect_as(url: str, token: str, *, name: str = "test-principal") -> NATS:
    """A connection to `url` as the principal holding `token`: admitted (or refused) by the auth
    callout, with that principal's permissions on the bus."""
    return await connect(url, name=name, credentials=Credentials(token=token))


def migrated(url: str) -> str:
    """Bring the database at `url` to the newest schema (from synchronous fixtures); return `url`."""
    from herder.services.common import database, migrate

    async def upgrade() -> None:
        engine = database.create_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(upgrade())
    return url


def wait_until(check: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.05) -> T:
    """The blocking twin of `eventually`, for tests that drive subprocesses."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class Postgres:
    """The PostgreSQL server of HERDER_TEST_POSTGRES, handing out throw-away databases."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = make_url(url).set(drivername="postgresql")
        self._admin = psycopg.connect(
            self.url.render_as_string(hide_password=False), autocommit=True, connect_timeout=3
        )

    def url_of(self, database: str) -> str:
        """The URL of `database` on this server."""
        return self.url.set(database=database).render_as_string(hide_password=False)

    @contextmanager
    def database(self, template: str | None = None) -> Iterator[str]:
        """A fresh database (a copy of `template` if given), dropped afterwards; yields its URL."""
        name = f"herder_t_{uuid.uuid4().hex[:12]}"
        self.create(name, template)
        try:
            yield self.url_of(name)
        finally:
            self.drop(name)

    def create(self, name: str, template: str | None = None) -> None:
        """Create a database that outlives one test."""
        clause = f' TEMPLATE "{template}"' if template else ""
        self._admin.execute(f'CREATE DATABASE "{name}"{clause}')

    def drop(self, name: str) -> None:
        """Drop a database, whoever is connected to it."""
        self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        """Close the administrative connection."""
        self._admin.close()


def connect_postgres() -> Postgres:
    """The test PostgreSQL; skips with the reason on a laptop without one, fails in CI."""
    try:
        return Postgres(POSTGRES_URL)
    except Exception as exc:
        reason = f"PostgreSQL at {make_url(POSTGRES_URL).render_as_string()} is not reachable: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)
