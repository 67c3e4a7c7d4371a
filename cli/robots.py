"""`herder robot add|list|show|remove|run`: registering robots, running one, and running a process by hand on one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import platformdirs
import typer

from herder.cli.context import (
    CONTEXT_FILE,
    ENV_BUNDLE,
    BundleOption,
    Context,
    DataDirOption,
    JsonOption,
    Target,
    TokenFileOption,
    UrlOption,
    call,
    connected,
    default_data_dir,
    read_token_file,
    resolve,
)
from herder.cli.output import (
    EXIT_ERROR,
    EXIT_USAGE,
    Column,
    Failed,
    WideOption,
    ago,
    check_new_file,
    fail,
    parse_size,
    print_json,
    print_table,
    run,
    when,
)
from herder.client import logs
from herder.client.bundle import Bundle, read_bundle, write_bundle
from herder.client.errors import SetupError
from herder.protocol.errors import Unauthenticated
from herder.protocol.jobs import MAX_INPUT_BYTES, LogStream, Outcome
from herder.protocol.messages import new_id
from herder.protocol.packages import PackageRef, PackageResolve
from herder.protocol.queues import DEFAULT_QUEUE_WAIT_S
from herder.protocol.registry import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    MAX_HEARTBEAT_INTERVAL_S,
    MIN_HEARTBEAT_INTERVAL_S,
    RobotAdd,
    RobotInfo,
    RobotListRequest,
    RobotRemove,
    RobotShow,
    RobotType,
)
from herder.protocol.secrets import RobotKeyReset
from herder.protocol.values import parse_json_object

if TYPE_CHECKING:
    from herder.robot.agent import RobotAgent
    from herder.robot.runner import LogLine, RunResult

ENV_ROBOT_TOKEN = "HERDER_ROBOT_TOKEN"

robot_app = typer.Typer(help="Robots: register them, see them, run one on this machine.", no_args_is_help=True)


@robot_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The robot's name: letters, digits, '-' or '_'.")],
    robot_type: Annotated[
        RobotType,
        typer.Option("--type", help="unattended robots take jobs from herder; attended ones work beside a person."),
    ],
    host: Annotated[
        str, typer.Option("--host", help="The machine or terminal server it runs on (a short name, no dots).")
    ],
    groups: Annotated[
        list[str] | None, typer.Option("--group", help="A group (pool) it belongs to; repeat for several.")
    ] = None,
    save_token: Annotated[
        Path | None,
        typer.Option(
            "--save-token",
            help="Write the robot's token to this file (readable by you alone) instead of printing it.",
        ),
    ] = None,
    bundle_out: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            help="Write the robot's connection bundle to this new file (mode 0600): the stack's URLs, its CA "
            "and the robot's token. Copy it to the robot's machine and run 'herder robot run NAME --bundle FILE'.",
        ),
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Register a robot. Its token is shown once, now (or saved with --save-token, or put in a bundle with
    --bundle); herder keeps only a hash."""
    request = RobotAdd(name=name, type=robot_type, host=host, groups=groups or [])
    target = resolve(data_dir, url, token_file, _env_bundle())
    # The token's file is made before the robot is registered: a path that cannot be written must not
    # leave a robot whose token nobody has.
    if bundle_out is not None:
        check_new_file(bundle_out, "the robot's bundle")
    secret_file = _create_secret_file(save_token) if save_token is not None else None
    try:
        added = call(target, lambda c: c.request(request))
    except BaseException:
        if secret_file is not None and save_token is not None:
            secret_file.close()
            save_token.unlink(missing_ok=True)
        raise
    if secret_file is not None:
        with secret_file:
            secret_file.write(added.token + "\n")
    if bundle_out is not None:
        write_bundle(bundle_out, _bundle_of(target, added.token, robot=name))
    if json_out:
        print_json(added.robot if save_token or bundle_out else added)
        return
    robot = added.robot
    groups_text = f" in {', '.join(robot.groups)}" if robot.groups else ""
    print(f"added {robot.type.value} robot {robot.name} on host {robot.host}{groups_text}", file=sys.stderr)
    if bundle_out is not None:
        print(
            f"its bundle is in {bundle_out}; copy it to the robot's machine and run: "
            f"herder robot run {robot.name} --bundle {bundle_out.name}"
        )
    elif save_token is not None:
        print(f"its token is in {save_token}; run it with: herder robot run {robot.name} --token-file {save_token}")
    else:
        print("its token, shown this once (run it with --token-file FILE or HERDER_ROBOT_TOKEN):", file=sys.stderr)
        print(added.token)


def _env_bundle() -> Path | None:
    """The bundle HERDER_BUNDLE names: where a command whose own --bundle writes one finds the stack."""
    value = os.environ.get(ENV_BUNDLE)
    return Path(value) if value else None


def _bundle_of(target: Target, token: str, *, robot: str | None = None) -> Bundle:
    """A bundle reaching the target's stack with `token`."""
    return Bundle(
        urls=list(target.advertised_urls or (target.nats_url,)),
        ca_pem=target.ca_pem,
        token=token,
        tenant=target.tenant,
        robot=robot,
    )


def _create_secret_file(path: Path) -> TextIO:
    """A new file, readable by its owner alone, to hold a token."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{path} exists already; choose a new file for the robot's token")
    except OSError as exc:
        fail(f"cannot write the robot's token to {path}: {exc.strerror or exc}; the robot was not added")
    return os.fdopen(fd, "w")


# `robot list` on a narrow terminal: LAST HEARTBEAT goes first, then CURRENT JOB; GROUPS is cut to the
# room left; NAME, TYPE, HOST and STATUS are always whole.
ROBOT_COLUMNS = (
    Column("NAME"),
    Column("TYPE"),
    Column("HOST"),
    Column("STATUS"),
    Column("LAST HEARTBEAT", drop=1),
    Column("CURRENT JOB", drop=2),
    Column("GROUPS", cut=True, min_width=12),
)


def _rows(robots: list[RobotInfo]) -> list[tuple[object, ...]]:
    return [
        (
            robot.name,
            robot.type.value,
            robot.host,
            robot.status.value,
            ago(robot.last_heartbeat) if robot.last_heartbeat else "never",
            robot.current_job[:12] if robot.current_job else None,
            ", ".join(robot.groups) or None,
        )
        for robot in robots
    ]


@robot_app.command("list")
def list_robots(
    group: Annotated[str | None, typer.Option("--group", help="Only the robots of this group.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Only the robots of this host.")] = None,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """List robots: status, host, type, last heartbeat and current job."""
    request = RobotListRequest(group=group, host=host)
    listed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(request))
    if json_out:
        print_json(listed.robots)
        return
    print_table(ROBOT_COLUMNS, _rows(listed.robots), wide=wide)


@robot_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="The robot.")],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one robot."""
    robot = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(RobotShow(name=name)))
    if json_out:
        print_json(robot)
        return
    fields = [
        ("name", robot.name),
        ("type", robot.type.value),
        ("host", robot.host),
        ("groups", ", ".join(robot.groups) or "-"),
        ("status", f"{robot.status.value} since {when(robot.status_since)} UTC"),
        (
            "last heartbeat",
            f"{when(robot.last_heartbeat)} UTC ({ago(robot.last_heartbeat)})" if robot.last_heartbeat else "never",
        ),
        ("heartbeat every", f"{robot.heartbeat_interval_s:g} s"),
        ("current job", robot.current_job or "-"),
        ("agent version", robot.agent_version or "-"),
        ("added", f"{when(robot.created_at)} UTC by {robot.created_by or '-'}"),
    ]
    for label, value in fields:
        print(f"{label:<16} {value}")


@robot_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The robot.")],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Remove a robot that runs no job; its token stops working at once."""
    removed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(RobotRemove(name=name)))
    if json_out:
        print_json(removed.robot)
    else:
        print(f"removed robot {removed.robot.name}")


@robot_app.command("reset-key")
def reset_key(
    name: Annotated[str, typer.Argument(help="The robot.")],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Forget a robot's sealing key (the robot was reinstalled, its key lost); its agent registers a new
    one when it next starts. Until then no credential can be sealed to it."""
    reset = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(RobotKeyReset(robot=name)))
    if json_out:
        print_json(reset)
    else:
        print(f"robot {reset.robot}: its sealing key is forgotten; its agent registers a new one when it starts")


@robot_app.command("run")
def run_robot(
    name: Annotated[str, typer.Argument(help="The robot to run, as registered with 'herder robot add'.")],
    bundle: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            envvar=ENV_BUNDLE,
            show_envvar=True,
            help="The robot's connection bundle, from 'herder robot add --bundle': the stack's URLs, CA and "
            "the robot's token, in one file. The one thing a robot machine needs.",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help=f"File holding the robot's token ('-' reads standard input); {ENV_ROBOT_TOKEN} works too. "
            "Tokens are never taken on the command line.",
        ),
    ] = None,
    heartbeat: Annotated[
        float,
        typer.Option(
            "--heartbeat",
            help="Seconds between heartbeats; three missed ones make the robot Unresponsive.",
            min=MIN_HEARTBEAT_INTERVAL_S,
            max=MAX_HEARTBEAT_INTERVAL_S,
        ),
    ] = DEFAULT_HEARTBEAT_INTERVAL_S,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Where the robot keeps its package cache, job folders and the spool of what it could not deliver yet.",
        ),
    ] = None,
    max_package_size: Annotated[
        str,
        typer.Option(
            "--max-package-size",
            help="The most a package may unpack to on this robot (e.g. 500MiB, 2GiB); a larger one faults its job.",
        ),
    ] = "1GiB",
    queue_wait: Annotated[
        float,
        typer.Option(
            "--queue-wait",
            min=0,
            max=3600,
            help="Seconds a script's queue call waits for herder to come back (a restart) before it fails "
            "with 'unavailable'.",
        ),
    ] = DEFAULT_QUEUE_WAIT_S,
    process: Annotated[
        str | None,
        typer.Option(
            "--run",
            metavar="PROCESS",
            help="On an attended robot: run this process once, by hand, on this terminal (its queue calls go "
            "through the robot), then exit: 0 when it succeeded.",
        ),
    ] = None,
    version: Annotated[
        str | None, typer.Option("--version", help="With --run: the version to run (default: the newest).")
    ] = None,
    input_json: Annotated[
        str | None, typer.Option("--input", help="With --run: the process's input, a JSON object.")
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help="debug, info, warning or error (default: info; warning with --run)."),
    ] = None,
    log_format: Annotated[
        str, typer.Option("--log-format", help="auto (console on a terminal, else JSON), json or console.")
    ] = "auto",
) -> None:
    """Run a robot on this machine, in the foreground, until Ctrl-C or SIGTERM; or, with --run, run one
    process by hand on an attended robot.

    It connects with the robot's own token, heartbeats, and runs the jobs herder sends it, one at a
    time, each in a child process of its own. On shutdown it hard-stops a running job, reports it,
    and says goodbye, so the robot shows as Disconnected at once. A robot removed from herder stops
    with one line saying so, and a non-zero exit.

    With --run PROCESS (attended robots only: herder starts the jobs of unattended ones) it connects
    as the robot, fetches the process's package, runs it once with the person's terminal as its
    input and output, shows its log lines as they come, and exits 0 when it succeeded, 1 with one
    line when it did not. Ctrl-C interrupts the script (it sees KeyboardInterrupt) and hard-stops it
    5 s later if it goes on. The run is the robot's (its queue items are held by the robot) but no
    herder job: nothing is reported to the jobs service, and items it leaves unfinished are failed
    (application exception), as those of a job that ends.
    """
    if process is None and (version is not None or input_json is not None):
        fail("--version and --input go with --run PROCESS", EXIT_USAGE)
    logs.configure(log_level or ("warning" if process else "info"), log_format)
    limit = parse_size(max_package_size, what="--max-package-size")
    # Checked before connecting: a wrong name or input must not start a session of the robot.
    resolving = PackageResolve(process=process, version=version) if process is not None else None
    input_ = parse_json_object(input_json, what="--input", max_bytes=MAX_INPUT_BYTES) if input_json else {}
    target = _robot_target(name, bundle, token_file, data_dir, url)
    folder = (work_dir or Path(platformdirs.user_cache_dir("herder")) / "robots" / name).expanduser().resolve()
    agent_options: dict[str, Any] = {
        "work_dir": folder,
        "heartbeat_interval_s": heartbeat,
        "max_package_bytes": limit,
        "queue_wait_s": queue_wait,
    }
    if resolving is None:
        run(lambda: _run(target, name, agent_options))
        return
    ref, result = run(lambda: _run_attended(target, name, agent_options, resolving, input_))
    ended = f"{ref.process} {ref.version} ended {result.outcome.value.capitalize()}"
    if result.outcome is not Outcome.SUCCESSFUL:
        raise Failed(f"{ended}: {result.error or result.reason}", EXIT_ERROR, result.outcome.value.lower())
    if result.output is not None:
        print(json.dumps(result.output, ensure_ascii=False))
    print(f"{ended} ({result.reason})", file=sys.stderr)


def _robot_target(
    name: str, bundle: Path | None, token_file: Path | None, data_dir: Path | None, url: str | None
) -> Target:
    """Where the stack is and the robot's own token: from its bundle, or a token given with the stack's
    URL or data folder (never the stack's admin token: a robot acts as itself alone)."""
    given = read_token_file(token_file) if token_file else os.environ.get(ENV_ROBOT_TOKEN)
    source = f"--token-file {token_file}" if token_file else ENV_ROBOT_TOKEN
    if bundle is not None:
        found = read_bundle(bundle)
        if found.robot is not None and found.robot != name:
            fail(f"{bundle} is robot {found.robot}'s bundle, not {name}'s; run 'herder robot run {found.robot}'")
        target = resolve(None, url, None, bundle)
        return replace(target, token=given or target.token, token_source=source if given else target.token_source)
    if not given:
        fail(
            f"give robot {name}'s bundle with --bundle FILE, or its token with --token-file FILE or "
            f"{ENV_ROBOT_TOKEN} (both were made by 'herder robot add')"
        )
    if url:
        return replace(resolve(None, url, None), token=given, token_source=source)
    folder = data_dir or default_data_dir()
    context = Context.read(folder / CONTEXT_FILE)
    return Target(
        nats_url=context.nats_url,
        token=given,
        tenant=context.tenant,
        where=str(folder),
        token_source=source,
        ca_pem=context.ca_pem(),
    )


def _refused(target: Target, name: str) -> str:
    return (
        f"robot {name}'s token (from {target.token_source}) was refused: the robot was removed, the token is "
        "not its own, or no auth service is running; give the bundle or token 'herder robot add' made for it "
        f"with --bundle FILE, --token-file FILE or {ENV_ROBOT_TOKEN}"
    )


@contextlib.asynccontextmanager
async def _agent_session(
    target: Target, name: str, agent_options: dict[str, Any], signalled: asyncio.Event
) -> AsyncIterator[RobotAgent]:
    """The robot's agent, connected and started (SIGINT and SIGTERM set `signalled`); stopped after the
    block. A refused token, a work folder another agent holds, and a removal are one line each."""
    from herder.robot.agent import ConnectionEvents, RobotAgent
    from herder.robot.spool import SpoolLocked

    assert target.token is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    refused = _refused(target, name)
    # The agent hears of its connection's losses and returns; it exists once the connection does.
    events = ConnectionEvents()
    async with connected(target, f"herder-robot-{name}", refused=refused, **events.options()) as nc:
        agent = RobotAgent(nc, robot=name, token=target.token, tenant=target.tenant, **agent_options)
        events.attach(agent)
        try:
            await agent.start()
        except Unauthenticated:
            raise Unauthenticated(refused) from None
        except SpoolLocked:
            raise SetupError(
                f"robot {name} runs already from {agent.work_dir} ('herder robot run {name}'); stop that agent first: "
                "a robot has one agent at a time"
            ) from None
        removed = asyncio.ensure_future(agent.removed.wait())
        removed.add_done_callback(lambda _: signalled.set())
        try:
            yield agent
        finally:
            removed.cancel()
            await agent.stop()
        if agent.removed.is_set():
            raise SetupError(f"robot {name} was removed from herder ({agent.removed_because}); it stops")


async def _run(target: Target, name: str, agent_options: dict[str, Any]) -> None:
    stop = asyncio.Event()
    async with _agent_session(target, name, agent_options, stop) as agent:
        assert agent.info is not None
        info = agent.info
        print(
            f"robot {info.name} ({info.type.value}, host {info.host}) is connected to {target.where}; Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        if not agent.removed.is_set():
            print(f"robot {name} is stopping…", file=sys.stderr, flush=True)


async def _run_attended(
    target: Target, name: str, agent_options: dict[str, Any], resolving: PackageResolve, input_: dict[str, Any]
) -> tuple[PackageRef, RunResult]:
    """Connect as the robot, run one process by hand on this terminal, say goodbye; the package and how it ended."""
    interrupt = asyncio.Event()
    async with _agent_session(target, name, agent_options, interrupt) as agent:
        return await _attended(agent, name, resolving, input_, interrupt)


async def _attended(
    agent: RobotAgent, name: str, resolving: PackageResolve, input_: dict[str, Any], interrupt: asyncio.Event
) -> tuple[PackageRef, RunResult]:
    agent.check_attended()
    ref = await agent.resolve(resolving)
    job_id = new_id()
    print(
        f"robot {name} runs {ref.process} {ref.version} by hand (local run {job_id[:12]}, no herder job); "
        "Ctrl-C interrupts it.",
        file=sys.stderr,
        flush=True,
    )
    result = await agent.run_attended(ref, input_, job_id=job_id, on_log=_show_line, interrupt=interrupt)
    return ref, result


def _show_line(line: LogLine) -> None:
    print(terminal_line(line), file=sys.stdout if line.stream is LogStream.STDOUT else sys.stderr, flush=True)


def terminal_line(line: LogLine) -> str:
    """A log line of a run by hand, as the person at the terminal reads it: what the script printed as it
    is; its SDK records as `12:04:05 INFO    invoice.read number=42`; the agent's lines after `herder: `."""
    if line.stream in (LogStream.STDOUT, LogStream.STDERR):
        return line.message
    if line.stream is LogStream.AGENT:
        return f"herder: {line.message}"
    words = [_local_time(line.time), f"{line.level.value.upper():<7}", line.message]
    for key, value in line.fields.items():
        shown = value if isinstance(value, bool | int | float) or value is None else repr(value)
        words.append(f"{key}={shown}")
    return " ".join(words)


def _local_time(moment: datetime) -> str:
    return moment.astimezone().strftime("%H:%M:%S")
