"""Job dispatch: how fast a start request reaches a robot, and how many jobs a fleet gets through.

Run it with `make bench` or `.venv/bin/python tests/bench/bench_dispatch.py [--db sqlite|postgres|both] [--json]`.

One isolated nats-server is started (herder's `EmbeddedNats`, temporary store) and, for each
database, three processes share it:

* a child runs herder's services (auth, registry, packages, jobs) in one `ServiceHost`, on a fresh
  SQLite file or a fresh PostgreSQL database (from HERDER_TEST_POSTGRES);
* ROBOTS children each run one real robot agent (`RobotAgent`), as `herder robot run` does on a
  robot's machine; every job is a real child process of its agent, the no-op command `true` (or
  `--entry python`: a Python function that returns at once, through herder's entry wrapper and SDK);
* this process is the caller, with herder's `Client` and an admin token.

Everything runs behind the fence, as deployed: the services connect with the stack's service
credential, each robot and the caller with their own tokens, admitted by the auth service's
callout. The benchmark's own instruments (the robots' stamps, the caller's view of job events) use
connections of a service's rights, apart from the ones measured.

It measures four things:

1. dispatch latency: from the moment the caller sends a start request for a job aimed at an idle
   robot, to the moment that robot's agent receives the start command (its clock, stamped before
   it decodes the command; both processes read the same system clock). The caller keeps every
   robot busy: as soon as a robot's job ends, it sends that robot the next one. JOBS jobs after
   WARMUP untimed ones; p50, p99, mean and max.
2. throughput: JOBS no-op jobs created at once (CONCURRENCY callers) for a group holding all the
   robots, from the first start request until the last job is Successful; jobs per second, and
   the p50 and p99 of each job's time from its start request to its end.
3. connection set-up: from opening a connection through the fence to the first successful reply,
   for a CLI client (its token, then `whoami`) and for a robot (its token, then `robot_connect`);
   p50 and p99 over CONNECTIONS connections each.
4. a restarted stack: nats-server and the services stopped cleanly and started again on the same
   store and database while the robots run on, RESTARTS times; from the services being ready until
   every robot is Available by a heartbeat to the new stack (the robots reconnect with their own
   backoff); p50 and max.

Targets (dispatch on SQLite): p50 under 5 ms, p99 under 25 ms. The script reports whether they are
met and exits 0 either way on a completed run: it measures, it does not test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import environment, percentile
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from herder.cli.packages import publish_folder
from herder.client import logs
from herder.client.connection import Credentials, connect, sync
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.auth import WhoAmI
from herder.protocol.jobs import Command, JobStart, JobStateChangedEvent, StartCommand
from herder.protocol.messages import Event
from herder.protocol.registry import (
    RobotAdd,
    RobotConnect,
    RobotGoodbye,
    RobotListRequest,
    RobotStatus,
    RobotType,
)
from herder.robot.agent import ConnectionEvents, RobotAgent
from herder.services.common.credentials import ServiceCredential
from herder.services.common.natsserver import EmbeddedNats

TARGET_P50_MS = 5.0
TARGET_P99_MS = 25.0
DEFAULT_JOBS = 1000
DEFAULT_ROBOTS = 10
DEFAULT_WARMUP = 50
DEFAULT_CONCURRENCY = 16
DEFAULT_CONNECTIONS = 100
DEFAULT_RESTARTS = 5
RESTART_POLL_S = 0.05
GROUP = "bench"
PROCESS = "noop"
STAMPS_SUBJECT = "bench.robots.stamps"
READY = "bench-ready"
CHILD_START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 120.0
SERVICES_FLAG = "--serve-services"  # hidden: runs herder's services, in a child process
ROBOTS_FLAG = "--serve-robot"  # hidden: runs one robot agent, in a child process
SCRIPT = Path(__file__).resolve()
CREDENTIAL_FILE = "service-credential.json"
CONFIG_KEYS = ("jobs", "robots", "warmup", "concurrency", "entry", "connections", "restarts")
POSTGRES_URL = os.environ.get("HERDER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


# --- child: herder's services ---


def credential_file(root: Path) -> Path:
    """Where the benchmark keeps its stack's service credential."""
    return root / CREDENTIAL_FILE


async def serve_services(nats_url: str, db_url: str, data_dir: str) -> None:
    """Run every herder service until stdin closes; the first line printed holds the admin token."""
    from herder.services.auth.service import AuthService
    from herder.services.catalog import NAMES
    from herder.services.common.host import HostConfig, ServiceHost, resolve_services

    credential = ServiceCredential.read(credential_file(Path(data_dir).parent))
    host = ServiceHost(
        HostConfig(
            nats_url=nats_url,
            db_url=db_url,
            services=resolve_services(NAMES),
            credential=credential,
            data_dir=Path(data_dir),
        )
    )
    await host.start()
    try:
        auth = host.services["auth"]
        assert isinstance(auth, AuthService)
        admin = await auth.bootstrap_admin(None, may_rotate=False)
        print(f"{READY} {admin}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await host.stop()


# --- child: the robots ---


class StampingAgent(RobotAgent):
    """A robot agent that notes when each start command reached it, before anything else happens."""

    stamps: dict[str, int]

    async def _on_command(self, msg: Msg) -> None:
        received = time.time_ns()
        with contextlib.suppress(Exception):
            command = codec.load(Command, msg.data).command
            if isinstance(command, StartCommand):
                self.stamps.setdefault(command.job_id, received)
        await super()._on_command(msg)


async def serve_robot(nats_url: str, work_dir: str) -> None:
    """Run the robot named on stdin's first line (JSON: [name, token]) until stdin closes."""
    loop = asyncio.get_running_loop()
    name, token = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    stamps: dict[str, int] = {}
    # The robot is on the bus as itself; the benchmark's stamps travel on an instrument connection.
    # It hears of its connection's losses as `herder robot run` does: it rides out a restarted stack.
    events = ConnectionEvents()
    nc = await connect(nats_url, name=f"bench-robot-{name}", credentials=Credentials(token=token), **events.options())
    credential = ServiceCredential.read(credential_file(Path(work_dir).parent))
    instrument = await connect(nats_url, name=f"bench-stamps-{name}", credentials=credential.service)
    agent = StampingAgent(nc, robot=name, token=token, work_dir=Path(work_dir) / name)
    agent.stamps = stamps
    events.attach(agent)

    async def report(msg: Msg) -> None:
        await msg.respond(json.dumps(stamps).encode())

    await instrument.subscribe(f"{STAMPS_SUBJECT}.{name}", cb=report)
    await sync(instrument)
    await agent.start()
    print(READY, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await agent.stop(grace_s=2.0)
    await nc.close()
    await instrument.close()


# --- the caller ---


@dataclass
class Dispatch:
    """Dispatch latency: start request sent → start command received by the robot."""

    in_flight: int  # jobs running at once while measuring
    jobs: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    target_met: bool
    # The start request's own round trip, as the caller sees it: the job is created (and given to
    # its robot) when the reply arrives.
    reply_p50_ms: float
    reply_p99_ms: float


@dataclass
class Throughput:
    """Jobs created at once, until the last one is Successful."""

    jobs: int
    seconds: float
    jobs_per_s: float
    job_p50_ms: float
    job_p99_ms: float
    failed: int


@dataclass
class ConnectionSetup:
    """From opening a connection through the fence to its first successful reply."""

    connections: int
    p50_ms: float
    p99_ms: float


@dataclass
class Restart:
    """A restarted stack until every robot is Available again: nats-server and the services stopped
    (cleanly) and started on the same store and database, timed from the services being ready until
    each robot has heartbeated to the new stack."""

    restarts: int
    p50_s: float
    max_s: float


@dataclass
class Result:
    """The measurements on one database."""

    database: str
    dispatch: dict[str, Dispatch]  # by load: one job at a time, every robot busy
    throughput: Throughput
    connect: dict[str, ConnectionSetup]  # by principal: a CLI client, a robot
    restart: Restart


class Child:
    """One of the benchmark's child processes."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name

    @classmethod
    async def start(cls, name: str, *args: str, first_input: str | None = None) -> tuple[Child, str]:
        """Start this script with `args`, write `first_input` to its stdin, and wait for its ready line."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        child = cls(process, name)
        assert process.stdin is not None and process.stdout is not None
        if first_input is not None:
            process.stdin.write(first_input.encode() + b"\n")
            await process.stdin.drain()
        try:
            while True:
                line = (await asyncio.wait_for(process.stdout.readline(), CHILD_START_TIMEOUT_S)).decode().strip()
                if not line:
                    raise RuntimeError(f"the {name} process exited at start (code {await process.wait()})")
                if line.startswith(READY):
                    return child, line.removeprefix(READY).strip()
        except BaseException:
            await child.stop()
            raise

    async def stop(self) -> None:
        """Close its stdin (its signal to stop) and wait for it."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class Watcher:
    """Follows job state events: which jobs have ended, and how."""

    def __init__(self) -> None:
        self.ended: dict[str, tuple[str, int]] = {}  # job id -> (final state, time ended, ns)
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self.all_ended = asyncio.Event()
        self.expected: set[str] | None = None

    async def on_event(self, msg: Msg) -> None:
        event = codec.load(Event, msg.data)
        change = JobStateChangedEvent.model_validate(event.data)
        if not change.state.final:
            return
        self.ended[change.job_id] = (change.state.value, time.time_ns())
        waiter = self._waiters.pop(change.job_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(change.state.value)
        if self.expected is not None and self.expected <= self.ended.keys():
            self.all_ended.set()

    def ending(self, job_id: str) -> asyncio.Future[str]:
        """A future of the job's final state."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if job_id in self.ended:
            future.set_result(self.ended[job_id][0])
        else:
            self._waiters[job_id] = future
        return future


def noop_package(root: Path, entry: str) -> Path:
    """The process every benchmark job runs: it does nothing, in a real child process."""
    folder = root / "noop"
    folder.mkdir()
    if entry == "python":
        (folder / "noop.py").write_text("def main():\n    pass\n")
        manifest = '[entry]\npython = "noop:main"\n'
    else:
        manifest = '[entry]\ncommand = ["true"]\n'
    (folder / "herder.toml").write_text(f'name = "{PROCESS}"\nversion = "1.0.0"\n\n{manifest}')
    return folder


async def prepare(nc: NATS, client: Client, root: Path, robots: int, entry: str) -> dict[str, str]:
    """Register the robots and publish the no-op process; return robot name -> token."""
    tokens = {}
    for index in range(robots):
        name = f"bench-{index:02d}"
        added = await client.request(RobotAdd(name=name, type=RobotType.UNATTENDED, host="bench", groups=[GROUP]))
        tokens[name] = added.token
    await publish_folder(nc, client, noop_package(root, entry))
    return tokens


async def wait_available(client: Client, robots: int, *, heard_after: datetime | None = None) -> None:
    """Until every robot of the group is Available (and, with `heard_after`, heartbeated since)."""
    deadline = time.monotonic() + CHILD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        listed = (await client.request(RobotListRequest(group=GROUP))).robots
        available = [
            robot
            for robot in listed
            if robot.status is RobotStatus.AVAILABLE
            and (heard_after is None or (robot.last_heartbeat is not None and robot.last_heartbeat > heard_after))
        ]
        if len(available) == robots:
            return
        await asyncio.sleep(RESTART_POLL_S)
    raise RuntimeError("the robots did not all become Available")


async def measure_dispatch(
    client: Client, watcher: Watcher, robots: list[str], jobs: int, warmup: int, in_flight: int
) -> tuple[dict[str, int], list[int]]:
    """Start jobs on the robots in turn, each on an idle robot, `in_flight` at a time at most (the
    next one as soon as one ends); return job id -> the time its start request was sent, and the
    round trips of the timed start requests (ns)."""
    idle: asyncio.Queue[str] = asyncio.Queue()
    for robot in robots[:in_flight]:
        idle.put_nowait(robot)
    waiting = list(robots[in_flight:])
    sent: dict[str, int] = {}
    replies: list[int] = []

    async def free_when_done(robot: str, job_id: str) -> None:
        state = await asyncio.wait_for(watcher.ending(job_id), JOB_TIMEOUT_S)
        if state != "Successful":
            raise RuntimeError(f"benchmark job {job_id} ended {state}")
        # The robot that has waited longest goes next, so that all of them take turns.
        waiting.append(robot)
        idle.put_nowait(waiting.pop(0))

    followers = []
    for number in range(warmup + jobs):
        robot = await idle.get()
        started = time.time_ns()
        job = await client.request(JobStart(process=PROCESS, robot=robot))
        if number >= warmup:
            sent[job.id] = started
            replies.append(time.time_ns() - started)
        followers.append(asyncio.ensure_future(free_when_done(robot, job.id)))
    await asyncio.gather(*followers)
    return sent, sorted(replies)


async def measure_throughput(client: Client, watcher: Watcher, jobs: int, concurrency: int) -> Throughput:
    sent: dict[str, int] = {}
    remaining = jobs

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.time_ns()
            job = await client.request(JobStart(process=PROCESS, group=GROUP))
            sent[job.id] = started

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    watcher.expected = set(sent)
    if watcher.expected <= watcher.ended.keys():
        watcher.all_ended.set()
    await asyncio.wait_for(watcher.all_ended.wait(), JOB_TIMEOUT_S + jobs)
    seconds = time.perf_counter() - began
    durations = sorted(watcher.ended[job_id][1] - sent[job_id] for job_id in sent)
    failed = sum(watcher.ended[job_id][0] != "Successful" for job_id in sent)
    return Throughput(
        jobs=jobs,
        seconds=round(seconds, 3),
        jobs_per_s=round(jobs / seconds, 1),
        job_p50_ms=round(percentile(durations, 0.5) / 1e6, 1),
        job_p99_ms=round(percentile(durations, 0.99) / 1e6, 1),
        failed=failed,
    )


async def measure_connect(nats_url: str, client: Client, admin: str, connections: int) -> dict[str, ConnectionSetup]:
    """Open `connections` connections as a CLI client and as a robot, each to its first reply."""
    added = await client.request(RobotAdd(name="bench-connect", type=RobotType.UNATTENDED, host="bench"))

    async def cli() -> None:
        nc = await connect(nats_url, name="bench-cli", credentials=Credentials(token=admin))
        try:
            await Client(nc, token=admin).request(WhoAmI())
        finally:
            await nc.close()

    async def robot() -> None:
        nc = await connect(nats_url, name="bench-robot-connect", credentials=Credentials(token=added.token))
        try:
            session = uuid.uuid4().hex[:16]
            as_robot = Client(nc, token=added.token)
            await as_robot.request(RobotConnect(robot="bench-connect", session=session))
            await as_robot.request(RobotGoodbye(session=session))  # untimed: the connection is up
        finally:
            await nc.close()

    found = {}
    for principal, attempt in (("cli", cli), ("robot", robot)):
        times = []
        for _ in range(connections):
            started = time.perf_counter_ns()
            await attempt()
            times.append(time.perf_counter_ns() - started)
        times.sort()
        found[principal] = ConnectionSetup(
            connections=connections,
            p50_ms=round(percentile(times, 0.5) / 1e6, 2),
            p99_ms=round(percentile(times, 0.99) / 1e6, 2),
        )
    return found


async def measure_restart(
    server: EmbeddedNats, services: list[Child], services_args: tuple[str, ...], token: str, args: argparse.Namespace
) -> Restart:
    """Restart the whole stack `args.restarts` times while the robots stay up; `services` holds the
    services' child, replaced at each restart."""
    times = []
    for _ in range(args.restarts):
        await services[0].stop()
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)  # the same port and store
        services[0], _ = await Child.start("services", *services_args)
        ready, started = datetime.now(UTC), time.perf_counter()
        # A connection of its own: the caller's would be on its own reconnect backoff.
        async with contextlib.AsyncExitStack() as stack:
            nc = await connect(server.url, name="bench-restart", credentials=Credentials(token=token))
            stack.push_async_callback(nc.close)
            await wait_available(Client(nc, token=token, timeout=30.0), args.robots, heard_after=ready)
        times.append(time.perf_counter() - started)
    times.sort()
    return Restart(restarts=len(times), p50_s=round(percentile(times, 0.5), 2), max_s=round(times[-1], 2))


async def run_database(
    database: str, db_url: str, server: EmbeddedNats, root: Path, args: argparse.Namespace
) -> Result:
    nats_url = server.url
    services_args = (SERVICES_FLAG, nats_url, db_url, str(root / "services"))
    child, token = await Child.start("services", *services_args)
    services = [child]
    robot_children: list[Child] = []
    # The caller is a client, as an integrator would be; the benchmark watches events through a
    # connection of its own.
    nc = await connect(nats_url, name="bench-caller", credentials=Credentials(token=token))
    instrument = await connect(
        nats_url, name="bench-watcher", credentials=ServiceCredential.read(credential_file(root)).service
    )
    try:
        client = Client(nc, token=token, timeout=30.0)
        tokens = await prepare(nc, client, root, args.robots, args.entry)
        watcher = Watcher()
        await instrument.subscribe(
            subjects.event(subjects.DEFAULT_TENANT, "jobs", "job_state_changed"), cb=watcher.on_event
        )
        await sync(instrument)
        for name, robot_token in tokens.items():
            child, _ = await Child.start(
                f"robot {name}",
                ROBOTS_FLAG,
                nats_url,
                str(root / "robots"),
                first_input=json.dumps([name, robot_token]),
            )
            robot_children.append(child)
        await wait_available(client, args.robots)

        dispatch = {}
        for load, in_flight in (("one at a time", 1), ("every robot busy", args.robots)):
            sent, replies = await measure_dispatch(client, watcher, sorted(tokens), args.jobs, args.warmup, in_flight)
            stamps: dict[str, int] = {}
            for name in tokens:
                stamps.update(json.loads((await instrument.request(f"{STAMPS_SUBJECT}.{name}", b"", timeout=10)).data))
            latencies = sorted(stamps[job_id] - started for job_id, started in sent.items())
            p50, p99 = percentile(latencies, 0.5) / 1e6, percentile(latencies, 0.99) / 1e6
            dispatch[load] = Dispatch(
                in_flight=in_flight,
                jobs=len(latencies),
                p50_ms=round(p50, 2),
                p99_ms=round(p99, 2),
                mean_ms=round(sum(latencies) / len(latencies) / 1e6, 2),
                max_ms=round(latencies[-1] / 1e6, 2),
                target_met=p50 < TARGET_P50_MS and p99 < TARGET_P99_MS,
                reply_p50_ms=round(percentile(replies, 0.5) / 1e6, 2),
                reply_p99_ms=round(percentile(replies, 0.99) / 1e6, 2),
            )
        throughput = await measure_throughput(client, watcher, args.jobs, args.concurrency)
        connections = await measure_connect(nats_url, client, token, args.connections)
        restart = await measure_restart(server, services, services_args, token, args)
        return Result(database=database, dispatch=dispatch, throughput=throughput, connect=connections, restart=restart)
    finally:
        await nc.close()
        await instrument.close()
        await asyncio.gather(*(child.stop() for child in robot_children))
        await services[0].stop()


@contextlib.contextmanager
def postgres_database() -> Any:
    """A fresh PostgreSQL database on HERDER_TEST_POSTGRES's server, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(POSTGRES_URL).set(drivername="postgresql")
    name = f"herder_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.render_as_string(hide_password=False), autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def measure(args: argparse.Namespace, server: EmbeddedNats, root: Path) -> list[Result]:
    results = []
    for database in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        folder = root / database
        folder.mkdir()
        shutil.copy(credential_file(root), credential_file(folder))
        if database == "sqlite":
            results.append(await run_database(database, f"sqlite:///{folder / 'herder.db'}", server, folder, args))
            continue
        try:
            with postgres_database() as url:
                results.append(await run_database(database, url, server, folder, args))
        except ImportError:
            raise
        except Exception as exc:
            if args.db == "postgres":
                raise
            print(f"PostgreSQL skipped: {exc}", file=sys.stderr)
    return results


def render(results: list[Result], args: argparse.Namespace, env: dict[str, Any]) -> str:
    noop = "python function" if args.entry == "python" else "command `true`"
    lines = [
        f"Job dispatch and throughput: {args.robots} robots (a process each), {args.jobs} jobs per measurement, "
        f"no-op {noop} in a child process per job",
        f"  Python {env['python']}, nats-py {env['nats_py']}, SQLAlchemy {env['sqlalchemy']}, {env['nats_server']}, "
        f"{env['cpus']} CPUs",
        "",
        "  dispatch latency: start request sent -> start command received by the robot",
        f"  {'database':<9} {'load':<17} {'p50':>9} {'p99':>9} {'mean':>9} {'max':>9} "
        f"{'reply p50':>10} {'reply p99':>10}",
    ]
    for result in results:
        for load, d in result.dispatch.items():
            lines.append(
                f"  {result.database:<9} {load:<17} {d.p50_ms:>6.2f} ms {d.p99_ms:>6.2f} ms {d.mean_ms:>6.2f} ms "
                f"{d.max_ms:>6.1f} ms {d.reply_p50_ms:>7.2f} ms {d.reply_p99_ms:>7.2f} ms"
            )
    lines += [
        "",
        f"  throughput: {args.jobs} jobs created at once for a group of all the robots ({args.concurrency} callers)",
        f"  {'database':<9} {'jobs/s':>8} {'seconds':>8} {'job p50':>9} {'job p99':>9} {'failed':>7}",
    ]
    for result in results:
        t = result.throughput
        lines.append(
            f"  {result.database:<9} {t.jobs_per_s:>8.1f} {t.seconds:>8.1f} {t.job_p50_ms:>6.0f} ms "
            f"{t.job_p99_ms:>6.0f} ms {t.failed:>7}"
        )
    lines += [
        "",
        f"  connection set-up through the fence, to the first reply ({args.connections} connections each)",
        f"  {'database':<9} {'principal':<10} {'p50':>9} {'p99':>9}",
    ]
    for result in results:
        for principal, c in result.connect.items():
            lines.append(f"  {result.database:<9} {principal:<10} {c.p50_ms:>6.2f} ms {c.p99_ms:>6.2f} ms")
    lines += [
        "",
        f"  a restarted stack until every robot is Available again ({args.robots} robots, {args.restarts} restarts)",
        f"  {'database':<9} {'p50':>9} {'max':>9}",
    ]
    for result in results:
        r = result.restart
        lines.append(f"  {result.database:<9} {r.p50_s:>7.2f} s {r.max_s:>7.2f} s")
    lines.append("")
    for result in results:
        for load, d in result.dispatch.items():
            verdict = "met" if d.target_met else "NOT met"
            lines.append(
                f"  target dispatch p50 < {TARGET_P50_MS:g} ms and p99 < {TARGET_P99_MS:g} ms, "
                f"{result.database}, {load}: {verdict}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both", help="(%(default)s)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="jobs per measurement (%(default)s)")
    parser.add_argument("--robots", type=int, default=DEFAULT_ROBOTS, help="robot agents (%(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed jobs first (%(default)s)")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="callers creating jobs at once (%(default)s)"
    )
    parser.add_argument("--entry", choices=("command", "python"), default="command", help="the no-op (%(default)s)")
    parser.add_argument(
        "--connections", type=int, default=DEFAULT_CONNECTIONS, help="connections timed per principal (%(default)s)"
    )
    parser.add_argument(
        "--restarts", type=int, default=DEFAULT_RESTARTS, help="stack restarts timed at the end (%(default)s)"
    )
    args = parser.parse_args(argv)
    for option in ("jobs", "robots", "concurrency", "connections", "restarts"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def main(argv: list[str]) -> int:
    logs.configure(level="warning")
    if argv[:1] == [SERVICES_FLAG]:
        # HERDER_BENCH_PROFILE=FILE: the services' process writes a cProfile of its run to FILE.
        profile_to = os.environ.get("HERDER_BENCH_PROFILE")
        if profile_to:
            with cProfile.Profile() as profile:
                asyncio.run(serve_services(*argv[1:4]))
            profile.dump_stats(profile_to)
        else:
            asyncio.run(serve_services(*argv[1:4]))
        return 0
    if argv[:1] == [ROBOTS_FLAG]:
        asyncio.run(serve_robot(*argv[1:3]))
        return 0
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="herder-bench-") as folder:
        root = Path(folder)
        credential = ServiceCredential.generate()
        credential.write(credential_file(root))
        server = EmbeddedNats(root / "nats", credential=credential)
        server.start()
        try:
            results = asyncio.run(measure(args, server, root))
        finally:
            server.stop()
    env = environment()
    if args.json:
        document = {
            "benchmark": "job_dispatch",
            "targets": {"dispatch_p50_ms": TARGET_P50_MS, "dispatch_p99_ms": TARGET_P99_MS},
            "config": {k: getattr(args, k) for k in CONFIG_KEYS},
            "environment": env,
            "results": {result.database: asdict(result) for result in results},
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(results, args, env))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
