"""Running herder: `herder up` (the embedded stack), `herder service run`, `herder db upgrade`."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import structlog
import typer

from herder.cli.context import CONTEXT_FILE, Context, DataDirOption, default_data_dir
from herder.cli.output import fail, print_json, run
from herder.client import logs
from herder.client.connection import display_nats_url
from herder.client.errors import SetupError
from herder.client.tls import read_ca_file
from herder.protocol.version import VERSION
from herder.services import catalog
from herder.services.common.bus import JetStreamSettings

# The services' database code (SQLAlchemy, Alembic) is imported by the commands that run
# services, so that the other commands start in well under half the time.

DEFAULT_NATS_PORT = 4333
ENV_DB = "HERDER_DB"
ENV_CREDENTIAL = "HERDER_SERVICE_CREDENTIAL"
CREDENTIAL_FILE = "service-credential.json"
TLS_DIR = "tls"
# A stop that takes longer than STOP_SLOW_S logs what it still waits for; one that takes longer than
# STOP_DEADLINE_S dumps every thread's stack and exits, so that a hung stop never blocks a restart.
STOP_SLOW_S = 15.0
STOP_DEADLINE_S = 60.0

log = structlog.get_logger("herder")

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


@contextlib.asynccontextmanager
async def _bounded_stop() -> AsyncIterator[None]:
    """Around a stop: say what it waits for when it is slow, and end the process when it hangs."""
    faulthandler.dump_traceback_later(STOP_DEADLINE_S, exit=True)
    watch = asyncio.create_task(_report_slow_stop())
    try:
        yield
    finally:
        watch.cancel()
        faulthandler.cancel_dump_traceback_later()


async def _report_slow_stop() -> None:
    await asyncio.sleep(STOP_SLOW_S)
    me = asyncio.current_task()
    waiting = []
    for task in asyncio.all_tasks():
        if task is not me:
            stack = io.StringIO()
            task.print_stack(limit=8, file=stack)
            waiting.append(stack.getvalue())
    log.warning("host.stop_slow", after_s=STOP_SLOW_S, deadline_s=STOP_DEADLINE_S, waiting=waiting)


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
        typer.Option(
            "--nats",
            help="Use this NATS server instead of starting the bundled one (it must be fenced with this "
            "stack's service credential: see 'herder fence server-config').",
        ),
    ] = None,
    port: Annotated[
        int,
        typer.Option("--port", help="Port of the bundled NATS server (0 picks a free one).", min=0, max=65535),
    ] = DEFAULT_NATS_PORT,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            help="Address the bundled NATS server listens on. Anything but loopback serves TLS with the "
            "stack's own CA (made on first start in the data folder).",
        ),
    ] = "127.0.0.1",
    advertise: Annotated[
        list[str] | None,
        typer.Option(
            "--advertise",
            help="A host name (or HOST:PORT) robot machines reach this stack by, written into bundles and the "
            "server certificate; repeat for several. Default: this machine's name.",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Serve plain TCP beyond loopback: tokens then cross the network in the clear. Only on a "
            "network you trust.",
        ),
    ] = False,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "auto",
) -> None:
    """Start a whole herder stack in this process and keep it in the foreground.

    With no --nats, the bundled nats-server starts with its JetStream store in the data folder;
    with no --db, a SQLite database there holds the state. The NATS URL and an admin token go
    to <data folder>/context.json (readable by you alone), where every other herder command
    finds them. Every robot and client connects with its own token and may do on the bus only
    what its role allows. Ctrl-C or SIGTERM stops everything.
    """
    logs.configure(log_level, log_format)
    folder = _prepare_data_dir(data_dir)
    previous = _previous_context(folder)
    if previous and previous.pid and previous.pid != os.getpid() and _alive(previous.pid):
        fail(f"a herder stack already runs from {folder} (pid {previous.pid}); stop it or choose another --data-dir")
    beyond_loopback = not _is_loopback(listen)
    if beyond_loopback and insecure:
        print(
            f"herder: warning: serving plain TCP on {listen} (--insecure): tokens cross the network in the clear",
            file=sys.stderr,
            flush=True,
        )
    plan = _Listening(listen=listen, port=port, tls=beyond_loopback and not insecure, advertise=tuple(advertise or ()))
    run(lambda: _up(folder, previous, db, nats, plan))


@dataclass(frozen=True)
class _Listening:
    """How the bundled nats-server listens, and how other machines reach it."""

    listen: str
    port: int
    tls: bool
    advertise: tuple[str, ...]


def _is_loopback(address: str) -> bool:
    if address in ("localhost", ""):
        return address == "localhost"
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def _up(folder: Path, previous: Context | None, db: str | None, nats_url: str | None, plan: _Listening) -> None:
    from herder.services.auth.service import AuthService
    from herder.services.common import database
    from herder.services.common.credentials import ServiceCredential
    from herder.services.common.host import HostConfig, ServiceHost, resolve_services
    from herder.services.common.natsserver import EmbeddedNats

    embedded: EmbeddedNats | None = None
    host: ServiceHost | None = None
    context_path = folder / CONTEXT_FILE
    db_url = db or f"sqlite:///{folder / 'herder.db'}"
    database.parse_url(db_url)  # a bad URL fails here, before any server starts
    credential = ServiceCredential.load_or_create(folder / CREDENTIAL_FILE)
    ca_file: Path | None = None
    advertised: list[str] = []
    try:
        if nats_url is None:
            tls_files: tuple[Path, Path] | None = None
            if plan.tls:
                tls_files, ca_file = _certificates(folder / TLS_DIR, plan)
            embedded = EmbeddedNats(
                folder / "nats", credential=credential, host=plan.listen, port=plan.port, tls=tls_files
            )
            await asyncio.to_thread(embedded.start)
            nats_url = embedded.url
            advertised = _advertised_urls(plan, embedded.port)
        ca_pem = ca_file.read_text() if ca_file is not None else None
        host = ServiceHost(
            HostConfig(
                nats_url=nats_url,
                db_url=db_url,
                services=resolve_services(catalog.NAMES),
                credential=credential,
                ca_pem=ca_pem,
                data_dir=folder,
            )
        )
        await host.start()
        auth = host.services["auth"]
        assert isinstance(auth, AuthService)
        admin = await auth.bootstrap_admin(previous.token if previous else None, may_rotate=True)
        Context(
            nats_url=nats_url,
            token=admin,
            ca_file=str(ca_file) if ca_file is not None else None,
            advertised_urls=advertised or None,
            db_url=database.display_url(db_url),
            pid=os.getpid(),
        ).write(context_path)
        reach = f"\n  reach it  {', '.join(advertised)}  (TLS, CA {ca_file})" if ca_file is not None else ""
        print(
            f"herder {VERSION} is up\n"
            f"  NATS      {display_nats_url(nats_url)}{'  (bundled nats-server)' if embedded else ''}{reach}\n"
            f"  database  {database.display_url(db_url)}\n"
            f"  services  {', '.join(host.services)}\n"
            f"  context   {context_path} (NATS URL and admin token)\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        await _wait_for_signal()
        print("herder is stopping…", file=sys.stderr, flush=True)
    finally:
        async with _bounded_stop():
            if host is not None:
                await host.stop()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
        _clear_pid(context_path)


def _certificates(folder: Path, plan: _Listening) -> tuple[tuple[Path, Path], Path]:
    """The server certificate and key for TLS (made, or renewed, with the stack's CA), and the CA's file."""
    from herder.services.common.certificates import ensure_ca, ensure_server_certificate, local_names

    dns_names, ip_addresses = local_names(plan.listen)
    for name in plan.advertise:
        host = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        (ip_addresses if _is_ip(host) else dns_names).append(host)
    ca = ensure_ca(folder)
    server = ensure_server_certificate(folder, ca, dns_names=dns_names, ip_addresses=ip_addresses)
    return (server.cert_file, server.key_file), ca.cert_file


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _advertised_urls(plan: _Listening, port: int) -> list[str]:
    """The URLs bundles carry: the --advertise names (with the port unless given), else this machine's name."""
    scheme = "tls" if plan.tls else "nats"
    if not plan.advertise:
        host = socket.getfqdn() if plan.listen in ("0.0.0.0", "::") else plan.listen
        return [f"{scheme}://{host}:{port}"]
    return [f"{scheme}://{name}" if name.count(":") == 1 else f"{scheme}://{name}:{port}" for name in plan.advertise]


def _clear_pid(path: Path) -> None:
    with contextlib.suppress(SetupError, OSError):
        context = Context.read(path)
        if context.pid == os.getpid():
            context.pid = None
            context.write(path)


CredentialOption = Annotated[
    Path | None,
    typer.Option(
        "--credential",
        envvar=ENV_CREDENTIAL,
        show_envvar=True,
        help="The stack's service credential file (made by 'herder fence init'; herder up keeps its own in "
        f"the data folder). Default: <data folder>/{CREDENTIAL_FILE}.",
    ),
]


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
    credential_file: CredentialOption = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            "--ca-file",
            envvar="HERDER_CA_FILE",
            show_envvar=True,
            help="The CA certificate the NATS servers' TLS certificates come from (for tls:// URLs).",
        ),
    ] = None,
    stream_replicas: Annotated[
        int,
        typer.Option(
            "--stream-replicas",
            help="JetStream replicas of herder's streams and buckets (3 on a cluster). To run more processes "
            "of a service, start this command more times.",
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
    NATS queue group. The services connect with the stack's service credential; the NATS
    servers must be configured with it ('herder fence server-config'). When an auth service
    finds no admin token at all, it makes one and writes it to <data folder>/context.json.
    """
    logs.configure(log_level, log_format)
    if db is None:
        fail("say which database to use with --db URL or HERDER_DB")
    folder = (data_dir or default_data_dir()).expanduser()
    credential_path = credential_file or folder / CREDENTIAL_FILE
    ca_pem = read_ca_file(ca_file) if ca_file is not None else None
    run(lambda: _service_run(names, nats, db, data_dir, credential_path, ca_pem, stream_replicas, not no_migrate))


async def _service_run(
    names: list[str],
    nats_url: str,
    db_url: str,
    data_dir: Path | None,
    credential_path: Path,
    ca_pem: str | None,
    replicas: int,
    migrate_schema: bool,
) -> None:
    from herder.services.auth.service import AuthService
    from herder.services.common.credentials import ServiceCredential
    from herder.services.common.host import HostConfig, ServiceHost, resolve_services

    services = resolve_services(names)
    host = ServiceHost(
        HostConfig(
            nats_url=nats_url,
            db_url=db_url,
            services=services,
            credential=ServiceCredential.read(credential_path),
            ca_pem=ca_pem,
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
                ca_path = None
                if ca_pem is not None:
                    ca_path = folder / "ca.pem"
                    ca_path.write_text(ca_pem)
                Context(
                    nats_url=nats_url,
                    token=admin,
                    ca_file=str(ca_path) if ca_path else None,
                    advertised_urls=[server.strip() for server in nats_url.split(",")],
                ).write(folder / CONTEXT_FILE)
                print(f"created the first admin token; it is in {folder / CONTEXT_FILE}", flush=True)
        print(
            f"herder {VERSION}: {', '.join(host.services)} serving on {display_nats_url(nats_url)}; Ctrl-C stops.",
            flush=True,
        )
        await _wait_for_signal()
    finally:
        async with _bounded_stop():
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

    if db is None:
        folder = (data_dir or default_data_dir()).expanduser()
        if not (folder / "herder.db").exists() and not (folder / CONTEXT_FILE).exists():
            fail(
                f"no herder stack has run from {folder}, and no --db was given; say which database to upgrade "
                "with --db URL (or HERDER_DB), or --data-dir for a stack's folder"
            )
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
