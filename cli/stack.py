"""Running herder: `herder up` (the embedded stack), `herder service run`, `herder db upgrade`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from herder.cli.context import CONTEXT_FILE, Context, DataDirOption, default_data_dir
from herder.cli.output import fail, print_json, run
from herder.client import logs
from herder.client.connection import display_nats_url
from herder.client.errors import SetupError
from herder.protocol.version import VERSION
from herder.services import catalog
from herder.services.common.bus import JetStreamSettings
from herder.services.common.natsserver import EmbeddedNats

# The services' database code (SQLAlchemy, Alembic) is imported by the commands that run
# services, so that the other commands start in well under half the time.

DEFAULT_NATS_PORT = 4333
ENV_DB = "HERDER_DB"

LogLevelOption = Annotated[
    str, typer.Option("--log-level", help="debug, info, warning or error.", case_sensitive=False)
]
LogFormatOption = Annotated[
    str, typer.Option("--log-format", help="auto (console on a terminal, else JSON), json or console.")
]
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar=ENV_DB,
        show_envvar=True,
        help="Database URL: sqlite:///PATH or postgresql://USER@HOST/DB. Give a URL holding a "
        "password through HERDER_DB, not the command line.",
    ),
]


def _prepare_data_dir(data_dir: Path | None) -> Path:
    folder = (data_dir or default_data_dir()).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        fail(f"cannot create the data folder {folder}: {exc.strerror or exc}")
    return folder


def _previous_context(folder: Path) -> Context | None:
    path = folder / CONTEXT_FILE
    if not path.exists():
        return None
    try:
        return Context.read(path)
    except SetupError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def up(
    data_dir: DataDirOption = None,
    db: DbOption = None,
    nats: Annotated[
        str | None,
        typer.Option("--nats", help="Use this NATS server instead of starting the bundled one."),
    ] = None,
    port: Annotated[
        int,
        typer.Option("--port", help="Port of the bundled NATS server (0 picks a free one).", min=0, max=65535),
    ] = DEFAULT_NATS_PORT,
    listen: Annotated[str, typer.Option("--listen", help="Address the bundled NATS server listens on.")] = "127.0.0.1",
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "auto",
) -> None:
    """Start a whole herder stack in this process and keep it in the foreground.

    With no --nats, the bundled nats-server starts with its JetStream store in the data folder;
    with no --db, a SQLite database there holds the state. The NATS URL and an admin token go
    to <data folder>/context.json (readable by you alone), where every other herder command
    finds them. Ctrl-C or SIGTERM stops everything.
    """
    logs.configure(log_level, log_format)
    folder = _prepare_data_dir(data_dir)
    previous = _previous_context(folder)
    if previous and previous.pid and previous.pid != os.getpid() and _alive(previous.pid):
        fail(f"a herder stack already runs from {folder} (pid {previous.pid}); stop it or choose another --data-dir")
    run(lambda: _up(folder, previous, db, nats, port, listen))


async def _up(
    folder: Path, previous: Context | None, db: str | None, nats_url: str | None, port: int, listen: str
) -> None:
    from herder.services.auth.service import AuthService
    from herder.services.common import database
    from herder.services.common.host import HostConfig, ServiceHost, resolve_services

    embedded: EmbeddedNats | None = None
    host: ServiceHost | None = None
    context_path = folder / CONTEXT_FILE
    nats_token = previous.nats_token if previous and previous.nats_token else None
    db_url = db or f"sqlite:///{folder / 'herder.db'}"
    database.parse_url(db_url)  # a bad URL fails here, before any server starts
    try:
        if nats_url is None:
            nats_token = nats_token or secrets.token_urlsafe(24)
            embedded = EmbeddedNats(folder / "nats", host=listen, port=port, token=nats_token)
            await asyncio.to_thread(embedded.start)
            nats_url = embedded.client_url
        host = ServiceHost(
            HostConfig(nats_url=nats_url, db_url=db_url, services=resolve_services(catalog.NAMES), data_dir=folder)
        )
        await host.start()
        auth = host.services["auth"]
        assert isinstance(auth, AuthService)
        admin = await auth.bootstrap_admin(previous.token if previous else None, may_rotate=True)
        Context(
            nats_url=nats_url,
            token=admin,
            nats_token=nats_token if embedded else None,
            db_url=database.display_url(db_url),
            pid=os.getpid(),
        ).write(context_path)
        print(
            f"herder {VERSION} is up\n"
            f"  NATS      {display_nats_url(nats_url)}{'  (bundled nats-server)' if embedded else ''}\n"
            f"  database  {database.display_url(db_url)}\n"
            f"  services  {', '.join(host.services)}\n"
            f"  context   {context_path} (NATS URL and admin token)\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        await _wait_for_signal()
        print("herder is stopping…", file=sys.stderr, flush=True)
    finally:
        if host is not None:
            await host.stop()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        _clear_pid(context_path)


def _clear_pid(path: Path) -> None:
    with contextlib.suppress(SetupError, OSError):
        context = Context.read(path)
        if context.pid == os.getpid():
            context.pid = None
            context.write(path)


def service_run(
    names: Annotated[
        list[str], typer.Argument(help=f"Services to run: {', '.join(catalog.NAMES)}.", show_default=False)
    ],
    nats: Annotated[
        str,
        typer.Option("--nats", envvar="HERDER_URL", show_envvar=True, help="NATS URL (comma-separated for a cluster)."),
    ],
    db: DbOption = None,
    data_dir: DataDirOption = None,
    replicas: Annotated[
        int,
        typer.Option(
            "--replicas",
            help="JetStream replicas of herder's streams and buckets (3 on a cluster).",
            min=1,
            max=5,
        ),
    ] = 1,
    no_migrate: Annotated[
        bool,
        typer.Option("--no-migrate", help="Do not upgrade the schema at start (run 'herder db upgrade' first)."),
    ] = False,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "auto",
) -> None:
    """Run chosen services against an external NATS and database, in the foreground.

    Start as many processes of a service as you like: replicas share its requests through a
    NATS queue group. When an auth service finds no admin token at all, it makes one and writes
    it to <data folder>/context.json.
    """
    logs.configure(log_level, log_format)
    if db is None:
        fail("say which database to use with --db URL or HERDER_DB")
    run(lambda: _service_run(names, nats, db, data_dir, replicas, not no_migrate))


async def _service_run(
    names: list[str], nats_url: str, db_url: str, data_dir: Path | None, replicas: int, migrate_schema: bool
) -> None:
    from herder.services.auth.service import AuthService
    from herder.services.common.host import HostConfig, ServiceHost, resolve_services

    services = resolve_services(names)
    host = ServiceHost(
        HostConfig(
            nats_url=nats_url,
            db_url=db_url,
            services=services,
            data_dir=data_dir,
            jetstream=JetStreamSettings(replicas=replicas),
            migrate=migrate_schema,
        )
    )
    try:
        await host.start()
        auth = host.services.get("auth")
        if isinstance(auth, AuthService):
            admin = await auth.bootstrap_admin(None, may_rotate=False)
            if admin is not None:
                folder = _prepare_data_dir(data_dir)
                Context(nats_url=nats_url, token=admin).write(folder / CONTEXT_FILE)
                print(f"created the first admin token; it is in {folder / CONTEXT_FILE}", flush=True)
        print(
            f"herder {VERSION}: {', '.join(host.services)} serving on {display_nats_url(nats_url)}; Ctrl-C stops.",
            flush=True,
        )
        await _wait_for_signal()
    finally:
        await host.stop()


db_app = typer.Typer(help="The database: schema migrations.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Apply every pending migration (services do this at start unless told not to)."""
    from herder.services.common import database, migrate

    url = db or f"sqlite:///{_prepare_data_dir(data_dir) / 'herder.db'}"

    async def main() -> list[str]:
        engine = database.create_engine(url)
        try:
            return await migrate.upgrade(engine)  # an unusable database fails here, in one line
        finally:
            await engine.dispose()

    revisions = run(main)
    shown = database.display_url(url)
    if json_out:
        print_json({"database": shown, "revisions": revisions})
    else:
        print(f"{shown} is at {', '.join(revisions)}")
