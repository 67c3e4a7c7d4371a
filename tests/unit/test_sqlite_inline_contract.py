"""What the inline SQLite driver owes SQLAlchemy's aiosqlite dialect, read from the dialect's own source.

`sqlite_inline` stands in for aiosqlite under `sqlite+aiosqlite`; the dialect's adapter classes call
whatever they like on the driver connection, its cursors and its queue of calls. The scan below
lists those calls from the installed SQLAlchemy, so an upgrade that starts using something the
inline classes lack fails here rather than in production; the engine tests check that the calls
behave.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sqlite3
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select, text
from sqlalchemy.dialects.sqlite import aiosqlite as dialect_module
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from herder.services.common import database
from herder.services.common.sqlite_inline import InlineConnection, InlineCursor

ADAPTERS = (
    dialect_module.AsyncAdapt_aiosqlite_connection,
    dialect_module.AsyncAdapt_aiosqlite_cursor,
    dialect_module.AsyncAdapt_aiosqlite_ss_cursor,
)
# The annotations SQLAlchemy gives a parameter that holds the driver's connection or cursor.
DRIVER_ANNOTATIONS = {"AsyncIODBAPIConnection": "connection", "AsyncIODBAPICursor": "cursor"}
# Reached only from the generic asyncio adapter's own nextset() and setinputsizes(), which the SQLite
# dialect never calls: aiosqlite's cursor has neither, and the dialect works on aiosqlite.
NOT_IN_AIOSQLITE = {("cursor", "nextset"), ("cursor", "setinputsizes")}


@dataclass(frozen=True)
class Use:
    """One use of the driver by an adapter: `target.name`, read, assigned or called."""

    target: str  # "connection", "cursor" or "queue" (the connection's `_tx`)
    name: str
    where: str
    assigned: bool = False
    called: bool = False
    positional: int | None = None  # None: a call with *args, whose count the source does not say
    keywords: frozenset[str] | None = None  # None: a call with **kwargs


def _target(node: ast.expr, params: dict[str, str]) -> str | None:
    """Which driver object `node` evaluates to, if any."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return {"_connection": "connection", "_cursor": "cursor"}.get(node.attr)
    if isinstance(node, ast.Name):
        return params.get(node.id)
    if isinstance(node, ast.Attribute) and node.attr == "_tx" and _target(node.value, params) == "connection":
        return "queue"
    return None


def _driver_params(function: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, str]:
    params: dict[str, str] = {}
    for arg in function.args.args + function.args.kwonlyargs:
        annotation = arg.annotation
        name = annotation.id if isinstance(annotation, ast.Name) else getattr(annotation, "value", None)
        if isinstance(name, str) and name in DRIVER_ANNOTATIONS:
            params[arg.arg] = DRIVER_ANNOTATIONS[name]
    return params


def _uses_in(cls: type) -> Iterator[Use]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        where = f"{cls.__name__}.{function.name}"
        params = _driver_params(function)
        calls = {id(node.func): node for node in ast.walk(function) if isinstance(node, ast.Call)}
        for node in ast.walk(function):
            if not isinstance(node, ast.Attribute):
                continue
            target = _target(node.value, params)
            if target is None:
                continue
            call = calls.get(id(node))
            if call is None:
                yield Use(target, node.attr, where, assigned=isinstance(node.ctx, ast.Store))
                continue
            starred = any(isinstance(arg, ast.Starred) for arg in call.args)
            keywords = [keyword.arg for keyword in call.keywords]
            yield Use(
                target,
                node.attr,
                where,
                called=True,
                positional=None if starred else len(call.args),
                keywords=None if None in keywords else frozenset(k for k in keywords if k is not None),
            )


@functools.cache
def adapter_uses() -> frozenset[Use]:
    """Every use of the driver in the adapter classes of the installed dialect and their bases."""
    classes = {base for adapter in ADAPTERS for base in adapter.__mro__ if base is not object}
    return frozenset(use for cls in classes for use in _uses_in(cls))


@pytest.fixture
def inline(tmp_path: Path) -> Iterator[InlineConnection]:
    connection = InlineConnection(sqlite3.connect(tmp_path / "scan.db"))
    try:
        yield connection
    finally:
        connection.stop()


def _problem(use: Use, inline: InlineConnection) -> str | None:
    """What is wrong with `use` on the inline classes, or None."""
    if (use.target, use.name) in NOT_IN_AIOSQLITE:
        return None
    obj: Any = inline.cursor() if use.target == "cursor" else inline._tx if use.target == "queue" else inline
    if not hasattr(obj, use.name):
        return f"{use.where} uses .{use.name} of the driver {use.target}, which the inline {use.target} lacks"
    declared = inspect.getattr_static(obj, use.name)
    if use.assigned and isinstance(declared, property) and declared.fset is None:
        return f"{use.where} assigns .{use.name} of the driver {use.target}, read-only on the inline {use.target}"
    if use.called and use.positional is not None and use.keywords is not None:
        try:
            inspect.signature(getattr(obj, use.name)).bind(*[None] * use.positional, **dict.fromkeys(use.keywords))
        except TypeError as exc:
            return f"{use.where} calls .{use.name} of the driver {use.target} in a way the inline one refuses: {exc}"
    return None


def test_the_scan_sees_what_the_dialect_is_known_to_use() -> None:
    found = {(use.target, use.name) for use in adapter_uses()}
    connection = ("_connection", "_conn", "_tx", "cursor", "commit", "rollback", "close", "stop", "create_function")
    cursor = ("__aenter__", "execute", "executemany", "fetchone", "fetchmany", "fetchall", "close", "description")
    expected = {("connection", name) for name in (*connection, "isolation_level")}
    expected |= {("cursor", name) for name in (*cursor, "rowcount", "lastrowid", "arraysize")}
    expected |= {("queue", "put_nowait")}
    assert expected <= found, f"the scan no longer finds {sorted(expected - found)}; has the dialect moved?"


def test_the_inline_driver_has_everything_the_dialect_uses(inline: InlineConnection) -> None:
    problems = sorted({problem for use in adapter_uses() if (problem := _problem(use, inline)) is not None})
    assert problems == []


def test_what_the_inline_driver_may_lack_aiosqlite_lacks_too() -> None:
    for _target_name, name in NOT_IN_AIOSQLITE:
        assert not hasattr(aiosqlite.Cursor, name), f"aiosqlite's cursor now has {name}: give InlineCursor one"


def test_the_isolation_level_setter_gets_a_real_sqlite3_connection(inline: InlineConnection) -> None:
    # The dialect sets `isolation_level` on `_connection._conn` in a function it queues on `_tx`.
    assert isinstance(inline._conn, sqlite3.Connection)


def test_a_missing_method_is_reported(inline: InlineConnection) -> None:
    use = Use("cursor", "executescript", "Adapter.method", called=True, positional=1, keywords=frozenset())
    assert _problem(use, inline) == (
        "Adapter.method uses .executescript of the driver cursor, which the inline cursor lacks"
    )
    refused = Use("cursor", "fetchmany", "Adapter.method", called=True, positional=0, keywords=frozenset({"count"}))
    assert "refuses" in (_problem(refused, inline) or "")
    assert _problem(Use("cursor", "rowcount", "Adapter.method", assigned=True), inline) is not None


# Behaviour, through a real engine from herder's factory.

ITEMS = Table("items", MetaData(), Column("id", Integer, primary_key=True), Column("name", String, unique=True))


@dataclass
class Traced:
    """An engine whose sqlite3 connections report every statement and the thread that ran it."""

    engine: AsyncEngine
    statements: list[tuple[int, str]]


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[Traced]:
    engine = database.create_engine(f"sqlite:///{tmp_path / 'contract.db'}")
    statements: list[tuple[int, str]] = []

    def trace(dbapi_connection: Any, _record: Any) -> None:
        def record(statement: str) -> None:
            statements.append((threading.get_ident(), statement))

        dbapi_connection.driver_connection._conn.set_trace_callback(record)
        dbapi_connection.create_function("thread_ident", 0, threading.get_ident)

    # insert=True: before herder's own connect listener, so that its PRAGMAs are traced too.
    event.listen(engine.sync_engine, "connect", trace, insert=True)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(ITEMS.metadata.create_all)
        yield Traced(engine, statements)
    finally:
        await engine.dispose()


async def _names(connection: AsyncConnection) -> list[str]:
    return list((await connection.execute(select(ITEMS.c.name).order_by(ITEMS.c.id))).scalars())


async def test_insert_select_and_executemany(traced: Traced) -> None:
    async with traced.engine.begin() as connection:
        single = await connection.exec_driver_sql("INSERT INTO items (name) VALUES ('a')")
        assert single.rowcount == 1 and single.lastrowid == 1
        many = await connection.exec_driver_sql("INSERT INTO items (name) VALUES (?)", [("b",), ("c",), ("d",)])
        assert many.rowcount == 3
        await connection.execute(insert(ITEMS), [{"name": "e"}, {"name": "f"}])
    async with database.read(traced.engine) as connection:
        result = await connection.execute(select(ITEMS).order_by(ITEMS.c.id))
        assert list(result.keys()) == ["id", "name"]
        assert result.fetchone() == (1, "a")
        assert result.fetchmany(2) == [(2, "b"), (3, "c")]
        assert result.fetchall() == [(4, "d"), (5, "e"), (6, "f")]
        assert await connection.scalar(select(func.count()).select_from(ITEMS)) == 6


async def test_a_streamed_result_uses_the_server_side_cursor(traced: Traced) -> None:
    async with traced.engine.begin() as connection:
        await connection.execute(insert(ITEMS), [{"name": str(n)} for n in range(5)])
    async with database.read(traced.engine) as connection:
        result = await connection.stream(select(ITEMS.c.name).order_by(ITEMS.c.id))
        assert await result.fetchone() == ("0",)
        assert await result.fetchmany(2) == [("1",), ("2",)]
        assert [row async for row in result] == [("3",), ("4",)]


async def test_a_rollback_undoes_the_transaction(traced: Traced) -> None:
    async with traced.engine.connect() as connection:
        await connection.execute(insert(ITEMS), {"name": "gone"})
        await connection.rollback()
        assert await _names(connection) == []
        await connection.rollback()
    async with traced.engine.begin() as connection:
        await connection.execute(insert(ITEMS), {"name": "kept"})

    async def insert_twice() -> None:
        async with traced.engine.begin() as connection:
            await connection.execute(insert(ITEMS), {"name": "undone"})
            await connection.execute(insert(ITEMS), {"name": "kept"})

    with pytest.raises(IntegrityError):  # the driver's sqlite3 error, as SQLAlchemy's own
        await insert_twice()
    async with database.read(traced.engine) as connection:
        assert await _names(connection) == ["kept"]


async def test_the_isolation_level_goes_through_the_queue_of_calls(traced: Traced) -> None:
    async with traced.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        inline = raw.driver_connection
        assert isinstance(inline, InlineConnection)
        assert inline.isolation_level is None  # herder's connect listener turned sqlite3's own BEGIN off

        def set_level(value: str | None) -> None:
            raw.dbapi_connection.isolation_level = value  # type: ignore[union-attr]

        await connection.run_sync(lambda _sync: set_level("DEFERRED"))
        assert inline._conn.isolation_level == "DEFERRED"
        with pytest.raises(ValueError, match="isolation_level"):
            await connection.run_sync(lambda _sync: set_level("bogus"))
        await connection.run_sync(lambda _sync: set_level(None))
        assert inline._conn.isolation_level is None
        await connection.rollback()


async def test_functions_registered_through_the_dialect_work(traced: Traced) -> None:
    async with database.read(traced.engine) as connection:
        # regexp and floor are the pysqlite dialect's own, registered with create_function at connect.
        assert await connection.scalar(text("SELECT 'herder' REGEXP 'er$'")) == 1
        assert await connection.scalar(text("SELECT floor(2.5)")) == 2
        assert await connection.scalar(text("SELECT thread_ident()")) == threading.get_ident()


async def test_only_the_event_loops_thread_runs_sqlite(traced: Traced) -> None:
    async with traced.engine.begin() as connection:
        await connection.execute(insert(ITEMS), [{"name": "x"}, {"name": "y"}])
    async with database.read(traced.engine) as connection:
        await _names(connection)
    async with traced.engine.connect() as connection:
        await connection.invalidate()  # the dialect's terminate path closes the connection
    async with database.read(traced.engine) as connection:
        assert await _names(connection) == ["x", "y"]  # a fresh connection, traced again
    threads = {thread for thread, _statement in traced.statements}
    statements = [statement for _thread, statement in traced.statements]
    assert threads == {threading.get_ident()}
    assert {"BEGIN IMMEDIATE", "COMMIT", "ROLLBACK"} <= set(statements)
    assert any(statement.startswith("PRAGMA journal_mode") for statement in statements)


async def test_an_invalidated_connection_is_closed(traced: Traced) -> None:
    async with traced.engine.connect() as connection:
        inline = (await connection.get_raw_connection()).driver_connection
        assert isinstance(inline, InlineConnection) and inline._connection is not None
        await connection.invalidate()
    assert inline._connection is None
    with pytest.raises(sqlite3.ProgrammingError):
        inline._conn.execute("SELECT 1")


async def test_closing_twice_is_fine(inline: InlineConnection) -> None:
    async with inline.cursor() as cursor:
        await cursor.execute("SELECT 1")
        assert await cursor.fetchall() == [(1,)]
    await inline.close()
    inline.stop()
    await inline.close()
    assert inline._connection is None


async def test_an_inline_cursor_iterates_like_aiosqlites(inline: InlineConnection) -> None:
    cursor = await inline.cursor().execute("SELECT 1 UNION ALL SELECT 2")
    assert isinstance(cursor, InlineCursor)
    assert [row async for row in cursor] == [(1,), (2,)]
