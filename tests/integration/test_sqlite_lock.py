"""One process per SQLite database: a second herder process on the file is refused at start."""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from herder.client.errors import SetupError
from herder.services.common import database

# How long the other process would keep SQLite's write lock if it were let in.
HOLD_S = 3.0

# Another herder process: opens the database, takes SQLite's write lock for a while, and says how it went.
OTHER_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from sqlalchemy import text
    from herder.client.errors import SetupError
    from herder.services.common import database

    async def main(url: str, hold_s: float) -> int:
        try:
            engine = database.create_engine(url)
        except SetupError as exc:
            print(exc.message, flush=True)
            return 3
        try:
            async with database.read(engine) as connection:
                await connection.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: SQLite's write lock
                await asyncio.sleep(hold_s)
        finally:
            await engine.dispose()
        print("ok", flush=True)
        return 0

    sys.exit(asyncio.run(main(sys.argv[1], float(sys.argv[2]))))
    """
)


async def other_process(url: str, *, hold_s: float = 0.0, cwd: Path | None = None) -> tuple[int | None, list[str]]:
    """Run another herder process on `url`; its exit code and what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OTHER_PROCESS,
        url,
        str(hold_s),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert not err, err.decode()
    return process.returncode, out.decode().splitlines()


def refusal(path: Path, holder: str = f"process {os.getpid()}") -> str:
    """The line a process gets for a database another process uses."""
    return f"{path.resolve()} is in use by {holder}; run the services in one process, or use PostgreSQL"


async def select_one(engine: AsyncEngine) -> None:
    """A transaction that needs SQLite's lock, as every herder transaction does."""
    async with database.read(engine) as connection:
        assert (await connection.execute(text("SELECT 1"))).scalar() == 1


async def test_a_second_process_is_refused_until_the_first_disposes(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    url = f"sqlite:///{path}"
    engine = database.create_engine(url)
    try:
        await select_one(engine)
        assert await other_process(url) == (3, [refusal(path)])
        await engine.dispose()
        assert await other_process(url) == (0, ["ok"])
        await select_one(engine)  # a disposed engine used again claims the file again
        assert await other_process(url) == (3, [refusal(path)])
    finally:
        await engine.dispose()


async def test_the_first_process_does_not_wait_while_a_second_tries(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'herder.db'}"
    engine = database.create_engine(url)
    try:
        await select_one(engine)
        other = asyncio.create_task(other_process(url, hold_s=HOLD_S))
        slowest_s = 0.0
        while not other.done():
            started = time.perf_counter()
            await select_one(engine)
            slowest_s = max(slowest_s, time.perf_counter() - started)
            await asyncio.sleep(0.01)  # let the subprocess's pipes be read
        # Let in, the other process would hold SQLite's lock for HOLD_S, and this query wait it out.
        assert slowest_s < HOLD_S / 2
        assert (await other)[0] == 3
    finally:
        await engine.dispose()


async def test_engines_of_one_process_share_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "herder.db"
    (tmp_path / "link.db").symlink_to(path)
    monkeypatch.chdir(tmp_path)
    first = database.create_engine(f"sqlite:///{path}")
    second = database.create_engine("sqlite:///link.db")  # the same file, spelled otherwise
    try:
        await asyncio.gather(select_one(first), select_one(second))
        await first.dispose()
        await select_one(second)
        assert await other_process(f"sqlite:///{path}") == (3, [refusal(path)])
        await second.dispose()
        assert await other_process(f"sqlite:///{path}") == (0, ["ok"])
    finally:
        await first.dispose()
        await second.dispose()


async def test_every_spelling_of_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    (tmp_path / "link.db").symlink_to(path)
    engine = database.create_engine(f"sqlite:///{path}")
    try:
        assert await other_process(f"sqlite:///{tmp_path / 'link.db'}") == (3, [refusal(path)])
        assert await other_process("sqlite:///herder.db", cwd=tmp_path) == (3, [refusal(path)])
    finally:
        await engine.dispose()


async def test_the_lock_file_is_private_and_names_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    engine = database.create_engine(f"sqlite:///{path}")
    try:
        lock = tmp_path / "herder.db.lock"
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        assert lock.read_text().strip() == str(os.getpid())
    finally:
        await engine.dispose()


def test_a_holder_whose_pid_cannot_be_read_is_another_process(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    fd = os.open(tmp_path / "herder.db.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a holder that wrote no pid
        with pytest.raises(SetupError) as caught:
            database.create_engine(f"sqlite:///{path}")
        assert caught.value.message == refusal(path, "another process")
    finally:
        os.close(fd)


def test_a_forked_child_does_not_inherit_the_claim(tmp_path: Path) -> None:
    path = tmp_path / "herder.db"
    engine = database.create_engine(f"sqlite:///{path}")
    try:
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child: it reports through the pipe, and never returns into pytest
            os.close(read)
            try:
                database.create_engine(f"sqlite:///{path}")
                os.write(write, b"let in")
            except SetupError as exc:
                os.write(write, exc.message.encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            said = pipe.read().decode()
        os.waitpid(child, 0)
        assert said == refusal(path)
    finally:
        asyncio.run(engine.dispose())
