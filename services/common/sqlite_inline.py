"""SQLite for SQLAlchemy's asyncio engine, without a thread: sqlite3 calls run on the event loop.

SQLAlchemy's `sqlite+aiosqlite` dialect drives aiosqlite, which runs every call in a thread of its
own: a cursor, an execute, a fetch and a close are four round trips between threads, about 70 µs
each here, while SQLite answers from its page cache in about a microsecond. This module gives the
dialect a connection with aiosqlite's shape whose coroutines simply run the sqlite3 call and
return, so a statement costs what SQLite and SQLAlchemy cost and no more.

Running on the loop is safe because herder's transactions await nothing but the database between
BEGIN and COMMIT, and one process uses one connection per database file (the engine's pool holds
one): no coroutine of the same process can hold SQLite's lock while another waits for it. Another
process holding the lock does make this one wait, up to the busy timeout; several processes on one
database are what PostgreSQL is for.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class InlineCursor:
    """An aiosqlite-shaped cursor over a sqlite3 cursor."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        """Run one statement."""
        if parameters is None:
            self._cursor.execute(sql)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> InlineCursor:
        """Run one statement for each set of parameters."""
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        """The next row, or None."""
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        """Up to `size` more rows."""
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        """The remaining rows."""
        return self._cursor.fetchall()

    async def close(self) -> None:
        """Close the cursor."""
        self._cursor.close()

    @property
    def description(self) -> Any:
        """The columns of the last result."""
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        """Rows the last statement changed."""
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        """The rowid of the last inserted row."""
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        """How many rows `fetchmany` returns by default."""
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class _InlineQueue:
    """Stands in for aiosqlite's queue of calls: SQLAlchemy sets the isolation level through it."""

    __slots__ = ()

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as exc:
            future.set_exception(exc)


class InlineConnection:
    """An aiosqlite-shaped connection over a sqlite3 connection, for SQLAlchemy's aiosqlite dialect."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection
        self._connection: sqlite3.Connection | None = connection  # aiosqlite's "still open" flag
        self._tx = _InlineQueue()

    def cursor(self) -> InlineCursor:
        """A new cursor (used as `async with`)."""
        return InlineCursor(self._conn.cursor())

    async def commit(self) -> None:
        """Commit the transaction."""
        self._conn.commit()

    async def rollback(self) -> None:
        """Roll the transaction back."""
        self._conn.rollback()

    async def close(self) -> None:
        """Close the connection (again is fine)."""
        self.stop()

    def stop(self) -> None:
        """Close at once: what SQLAlchemy calls to terminate a connection."""
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, name: str, num_params: int, func: Callable[..., Any], **options: Any) -> None:
        """Register a SQL function."""
        self._conn.create_function(name, num_params, func, **options)

    @property
    def isolation_level(self) -> str | None:
        """sqlite3's isolation level (herder sets None and begins transactions itself)."""
        return self._conn.isolation_level


def creator(path: str, timeout_s: float) -> Callable[[], Any]:
    """An `async_creator` for `create_async_engine`: opens `path` with the given busy timeout."""

    async def connect() -> InlineConnection:
        # check_same_thread=False: SQLAlchemy may close a connection from its own clean-up thread.
        return InlineConnection(sqlite3.connect(path, timeout=timeout_s, check_same_thread=False))

    return connect
