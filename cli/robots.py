"""`herder robot add|list|show|remove|run`: registering robots, and running one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, TextIO

import platformdirs
import typer

from herder.cli.context import (
    CONTEXT_FILE,
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
from herder.cli.output import ago, fail, print_json, print_table, run, when
from herder.client import logs
from herder.protocol.errors import Unauthenticated
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
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Register a robot. Its token is shown once, now (or saved with --save-token); herder keeps only a hash."""
    request = RobotAdd(name=name, type=robot_type, host=host, groups=groups or [])
    # The token file is made before the robot is registered: a path that cannot be written must not
    # leave a robot whose token nobody has.
    secret_file = _create_secret_file(save_token) if save_token is not None else None
    try:
        added = call(resolve(data_dir, url, token_file), lambda c: c.request(request))
    except BaseException:
        if secret_file is not None and save_token is not None:
            secret_file.close()
            save_token.unlink(missing_ok=True)
        raise
    if secret_file is not None:
        with secret_file:
            secret_file.write(added.token + "\n")
    if json_out:
        print_json(added.robot if save_token else added)
        return
    robot = added.robot
    groups_text = f" in {', '.join(robot.groups)}" if robot.groups else ""
    print(f"added {robot.type.value} robot {robot.name} on host {robot.host}{groups_text}", file=sys.stderr)
    if save_token is not None:
        print(f"its token is in {save_token}; run it with: herder robot run {robot.name} --token-file {save_token}")
    else:
        print("its token, shown this once (run it with --token-file FILE or HERDER_ROBOT_TOKEN):", file=sys.stderr)
        print(added.token)


def _create_secret_file(path: Path) -> TextIO:
    """A new file, readable by its owner alone, to hold a token."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{path} exists already; choose a new file for the robot's token")
    except OSError as exc:
        fail(f"cannot write the robot's token to {path}: {exc.strerror or exc}; the robot was not added")
    return os.fdopen(fd, "w")


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
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """List robots: status, host, type, last heartbeat and current job."""
    listed = call(resolve(data_dir, url, token_file), lambda c: c.request(RobotListRequest(group=group, host=host)))
    if json_out:
        print_json(listed.robots)
        return
    print_table(["NAME", "TYPE", "HOST", "STATUS", "LAST HEARTBEAT", "CURRENT JOB", "GROUPS"], _rows(listed.robots))


@robot_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="The robot.")],
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one robot."""
    robot = call(resolve(data_dir, url, token_file), lambda c: c.request(RobotShow(name=name)))
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
    json_out: JsonOption = False,
) -> None:
    """Remove a robot that runs no job; its token stops working at once."""
    removed = call(resolve(data_dir, url, token_file), lambda c: c.request(RobotRemove(name=name)))
    if json_out:
        print_json(removed.robot)
    else:
        print(f"removed robot {removed.robot.name}")


@robot_app.command("run")
def run_robot(
    name: Annotated[str, typer.Argument(help="The robot to run, as registered with 'herder robot add'.")],
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
        typer.Option("--work-dir", help="Where the robot keeps its package cache and job folders."),
    ] = None,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    log_format: Annotated[
        str, typer.Option("--log-format", help="auto (console on a terminal, else JSON), json or console.")
    ] = "auto",
) -> None:
    """Run an unattended robot on this machine, in the foreground, until Ctrl-C or SIGTERM.

    It connects with the robot's own token, heartbeats, and runs the jobs herder sends it, one at a
    time, each in a child process of its own. On shutdown it hard-stops a running job, reports it,
    and says goodbye, so the robot shows as Disconnected at once.
    """
    logs.configure(log_level, log_format)
    secret = read_token_file(token_file) if token_file else os.environ.get(ENV_ROBOT_TOKEN)
    if not secret:
        fail(
            f"give robot {name}'s token with --token-file FILE or {ENV_ROBOT_TOKEN} "
            "(it was shown once by 'herder robot add')"
        )
    target = _stack(data_dir, url)
    folder = work_dir or Path(platformdirs.user_cache_dir("herder")) / "robots" / name
    run(lambda: _run(target, name, secret, folder.expanduser().resolve(), heartbeat))


def _stack(data_dir: Path | None, url: str | None) -> Target:
    """Where the stack is, without borrowing the stack's admin token: a robot acts as itself alone."""
    if url:
        return resolve(None, url, None)
    folder = data_dir or default_data_dir()
    context = Context.read(folder / CONTEXT_FILE)
    return Target(nats_url=context.nats_url, token=None, tenant=context.tenant, where=str(folder))


async def _run(target: Target, name: str, secret: str, work_dir: Path, heartbeat: float) -> None:
    from herder.robot.agent import RobotAgent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with connected(target, f"herder-robot-{name}") as nc:
        agent = RobotAgent(
            nc, robot=name, token=secret, tenant=target.tenant, work_dir=work_dir, heartbeat_interval_s=heartbeat
        )
        try:
            info = await agent.start()
        except Unauthenticated:
            raise Unauthenticated(
                f"robot {name}'s token was refused (unknown, or the robot was removed); give the token "
                f"'herder robot add' printed for it with --token-file FILE or {ENV_ROBOT_TOKEN}"
            ) from None
        print(
            f"robot {info.name} ({info.type.value}, host {info.host}) is connected to {target.where}; Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            print(f"robot {name} is stopping…", file=sys.stderr, flush=True)
            await agent.stop()
