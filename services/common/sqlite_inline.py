"""SQLite for SQLAlchemy's asyncio engine, without a thread: sqlite3 calls run on the event loop.

SQLAlchemy's `sqlite+aiosqlite` dialect drives aiosqlite, which runs every call in a thread of its
own: a cursor, an execute, a fetch and a close are four round trips between threads, about 70 µs
each here, while SQLite answers from its page cache in about a microsecond. This module gives the
dialect a connection with aiosqlite's shape whose coroutines simply run the sqlite3 call and
return, so a statement costs what SQLite and SQLAlchemy cost and no more.

Running on the loop is safe because herder's transactions await nothing but the database between
BEGIN and COMMIT, and one process uses one connection per database file (the engine's pool holds
one): no coroutine of the same process can hold SQLite's lock while another waits for it. Another
process holding the lock would freeze this one's event loop for up to the busy timeout, so a
`FileClaim` refuses a second process on the same file; several processes on one database are what
PostgreSQL is for.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herder.client.errors import SetupError

LOCK_SUFFIX = ".lock"
LOCK_FILE_MODE = 0o600
# Enough bytes for any pid the lock file can hold.
_PID_READ_BYTES = 32


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

    async def __aiter__(self) -> AsyncIterator[Any]:
        """The remaining rows, one at a time (how a server-side cursor is iterated)."""
        for row in self._cursor:
            yield row

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


@dataclass
class _Held:
    """The open lock file of one database, shared by every claim of this process on it."""

    fd: int
    claims: int


# flock belongs to an open file description: two descriptors of one process on one lock file would
# refuse each other, so a process opens each lock file once and counts the claims on it.
_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


def _forget_after_fork() -> None:
    # A forked child shares its parent's lock descriptions. Closing its copies leaves the parent's locks
    # alone and keeps them from outliving the parent in the child; a claim the child needs, it takes anew.
    global _held_guard
    for held in _held.values():
        os.close(held.fd)
    _held.clear()
    _held_guard = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_after_fork)


class FileClaim:
    """This process's claim on a SQLite database file, which refuses every other process meanwhile.

    The claim is an advisory lock (`flock`) on `<database>.lock`, a file beside the database holding
    the owner's pid so that a refused process can name it. The kernel drops the lock when its process
    dies, however it dies. Within a process any number of claims on one file coexist.
    """

    def __init__(self, database: Path) -> None:
        # Resolved, so that two spellings of one file (relative, through a symlink) are one claim.
        self.database = database.resolve()
        self.lock_path = self.database.with_name(self.database.name + LOCK_SUFFIX)
        # The process that holds this claim: a child forked from it does not, whatever it inherits.
        self._pid: int | None = None

    def acquire(self) -> None:
        """Hold the claim (holding it already is fine), or raise `SetupError` naming the process that has the file."""
        pid = os.getpid()
        with _held_guard:
            if self._pid == pid:
                return
            held = _held.get(self.lock_path)
            if held is None:
                held = _Held(fd=_lock(self.lock_path, self.database), claims=0)
                _held[self.lock_path] = held
            held.claims += 1
            self._pid = pid

    def release(self) -> None:
        """Give the claim up (again is fine); the last claim of the process unlocks the file."""
        with _held_guard:
            if self._pid != os.getpid():
                self._pid = None  # not held, or a forked child's copy of the parent's claim
                return
            self._pid = None
            held = _held[self.lock_path]
            held.claims -= 1
            if held.claims == 0:
                del _held[self.lock_path]
                os.close(held.fd)


def _lock(lock_path: Path, database: Path) -> int:
    """Open and lock `lock_path` and write this process's pid in it; return the descriptor, or raise `SetupError`."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
    except OSError as exc:
        raise SetupError(f"cannot open {str(lock_path)!r}, the lock file of {database}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise SetupError(
            f"{database} is in use by {holder}; run the services in one process, or use PostgreSQL"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise SetupError(f"cannot lock {str(lock_path)!r}, the lock file of {database}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock file open on `fd`, as the refusal names it."""
    try:
        pid = int(os.pread(fd, _PID_READ_BYTES, 0).decode("ascii").strip())
    except (OSError, ValueError):
        return "another process"
    return f"process {pid}" if pid > 0 else "another process"


def creator(claim: FileClaim, timeout_s: float) -> Callable[[], Any]:
    """An `async_creator` for `create_async_engine`: opens the claimed file with the given busy timeout.

    The claim is taken again first, in case the engine is used after a dispose released it."""
    path = str(claim.database)

    async def connect() -> InlineConnection:
        claim.acquire()
        # check_same_thread=False: SQLAlchemy may close a connection from its own clean-up thread.
        return InlineConnection(sqlite3.connect(path, timeout=timeout_s, check_same_thread=False))

    return connect
