"""Sealed credential fetches: how many a fleet of robots gets per second, and how long each one takes.

Run it with `make bench` or `.venv/bin/python tests/bench/bench_secrets.py [--db sqlite|postgres|both]
[--robots N] [--fetches N] [--warmup N] [--paced-rate N] [--crypto-ops N] [--json]`.

One isolated nats-server is started (herder's `EmbeddedNats`, temporary store, fenced) and, for
each database, herder's services run in a child process (the one `bench_dispatch.py` starts, every
service in one `ServiceHost`, the secrets service among them) on a fresh SQLite file (WAL,
synchronous=NORMAL, as herder sets it up) or a fresh PostgreSQL database (from HERDER_TEST_POSTGRES).

This process holds the robots: ROBOTS simulated robots, each registered with its own token and on
the bus through its own connection, as a robot agent is for `credential_fetch` to be allowed: it
starts its session (`robot_connect`) and heartbeats every interval, it registers an X25519 sealing
key of its own (`robot_key_set`), and it runs a job. For the job, one tiny process is published and
one job started per robot (`job_start`, aimed at the robot by name); the simulated robot listens on
its command subject as an agent does and acknowledges the start command (the jobs service holds
the job Running from the moment it gives it to the robot; the acknowledgement confirms the start,
so that the start is not sent again), and heartbeats as busy with it. It never runs anything. At the
end each robot reports its job Successful and says goodbye.

An admin client sets the credential `erp` (`set_credential`: its secret sealed to the service's
transport key on the way) and the text asset `erp-url`.

It measures, per database, after WARMUP untimed fetches in each mode:

1. closed loop, ROBOTS callers: FETCHES fetches per mode spread over the robots, each robot looping
   its share with one request in flight at a time (ROBOTS requests in flight in all). Two modes:
   * `sealed`: `credential_fetch` for the robot's job; the reply's box is opened on the robot's
     side with its private key, in the context the box is bound to (tenant, robot, job, name), and
     the opened bytes compared with the secret (a mismatch or a box that does not open is counted).
     The latency runs from the request sent to the box opened.
   * `unsealed`: the same robots read the asset (`asset_get`): the same service, the same
     authentication and scope resolution, no encryption, no job check, no read event. The value
     read is compared with the one set.
   Fetches per second from the first request sent to the last reply; p50/p99 of the latencies; the
   CPU time this process (the robots), the services' process and nats-server spent per fetch.
2. one at a time: one robot alone, one request in flight, SINGLE_FETCHES fetches per mode (at most
   FETCHES): the latency of a fetch that waits for no other.
3. paced (open loop, `sealed` only): FETCHES fetches due at PACED_RATE per second in all, each robot
   at its own fixed times (the robots' times interleaved), still one request in flight per robot: a
   robot whose previous fetch has not come back sends late, and a fetch not sent PACED_GRACE_S after
   the last one was due is not sent at all (counted: the service did not keep up). The latency runs
   from the time the fetch was due (a late send counts in it: no coordinated omission). This is the
   latency at a given load, which a closed loop cannot show: with ROBOTS requests always in flight,
   the latency is ROBOTS / throughput by Little's law (100 in flight at 2,000/s is 50 ms).
4. the sealing step alone, in this process and without the bus: the master key's envelope
   (`KeyRing.seal`, as a credential is stored; `KeyRing.open`, as each fetch reads it), the sealed
   box to the robot (`sealing.seal`, in the service; `sealing.open_sealed`, on the robot), and the
   crypto of one fetch end to end (stored secret opened, sealed to the robot's key from its text,
   the box as text and back, opened): µs per operation, the best of CRYPTO_ROUNDS rounds of
   CRYPTO_OPS operations.

During every timed run the registry's view of the robots is sampled every WATCH_S (`robot_list`):
the age of the oldest heartbeat it has recorded (it stamps a heartbeat when it has handled it, so a
backlog of heartbeats shows as age beyond the interval; at MISSED_HEARTBEATS intervals the robot is
Unresponsive, and the jobs service ends its job Faulted, after which its fetches are refused), and at
the end of the run whether every robot's job is still Running. After each run the next waits (up to
CATCH_UP_TIMEOUT_S) until the registry has caught up with the heartbeats left waiting, so that a run
does not pay for the previous one's backlog; the one-at-a-time runs take a robot whose job still runs.
The CPU the rest of the machine used meanwhile is shown too (from /proc/stat): another run on the
machine shows there.

Targets (sealed fetches): p50 under TARGET_P50_MS and at least TARGET_FETCHES_PER_S fetches/s, on
two cores; no mismatch and no error. The closed-loop p50 is judged as the issue asks, and the paced
p50 beside it (met only if every fetch was sent); a verdict on a run with refused fetches is "not
met". The machine's load average at the start (and end) is printed. The script reports whether each
target is met and exits 0 either way on a completed run: it measures, it does not test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench_dispatch import PROCESS, SERVICES_FLAG, Child, credential_file, noop_package, postgres_database
from benchlib import environment, percentile
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nats.aio.msg import Msg

from herder.cli.packages import publish_folder
from herder.client import logs, sealing
from herder.client.connection import Credentials, connect
from herder.client.requests import Client
from herder.client.secrets import set_credential
from herder.protocol import codec, subjects
from herder.protocol.errors import HerderError
from herder.protocol.jobs import (
    Command,
    CommandAck,
    JobReport,
    JobShow,
    JobStart,
    JobState,
    Outcome,
    StartCommand,
)
from herder.protocol.messages import utcnow
from herder.protocol.registry import (
    MISSED_HEARTBEATS,
    Heartbeat,
    RemovedCommand,
    RobotAdd,
    RobotConnect,
    RobotGoodbye,
    RobotListRequest,
    RobotType,
)
from herder.protocol.secrets import (
    AssetGet,
    AssetSet,
    AssetType,
    CredentialFetch,
    RobotKeySet,
    Scope,
    credential_fetch_context,
)
from herder.services.common.credentials import ServiceCredential
from herder.services.common.natsserver import EmbeddedNats
from herder.services.secrets.envelope import KeyRing
from herder.services.secrets.service import at_rest_context

TARGET_P50_MS = 3.0
TARGET_FETCHES_PER_S = 2000.0
TARGET_MISMATCHES = 0
DEFAULT_ROBOTS = 100
DEFAULT_FETCHES = 20_000
DEFAULT_WARMUP = 500
DEFAULT_PACED_RATE = TARGET_FETCHES_PER_S
DEFAULT_CRYPTO_OPS = 2000
CRYPTO_ROUNDS = 5
HEARTBEAT_INTERVAL_S = 5.0  # the robot agent's default
REQUEST_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 600.0
SINGLE_FETCHES = 1000  # fetches per mode by one robot alone, one at a time (at most --fetches)
PACED_GRACE_S = 1.0
LATE_NS = 1_000_000
WATCH_S = 2.0
WATCH_TIMEOUT_S = 10.0
CATCH_UP_TIMEOUT_S = 60.0
CATCH_UP_SLACK_S = 1.0
CATCH_UP_POLL_S = 0.5
JOBS_RUNNING_TIMEOUT_S = 60.0
POLL_S = 0.05
CREDENTIAL = "erp"
USERNAME = "robot-user"
ASSET = "erp-url"
ASSET_VALUE = "https://erp.example/"
MODES = ("sealed", "unsealed")
MODE_LABELS = {
    "sealed": "credential fetch, sealed to the robot and opened there",
    "unsealed": "asset read (no sealing, no job check)",
}
CONFIG_KEYS = ("robots", "fetches", "warmup", "paced_rate", "crypto_ops")


# --- measurements ---


@dataclass
class Cpu:
    """CPU time spent during a measurement, per fetch, by process (None: not readable here)."""

    caller_us: float  # this process: the robots (requests, replies, opening the boxes)
    services_us: float | None = None
    nats_us: float | None = None
    # The cores the rest of the machine kept busy meanwhile, on average: another run shows here.
    other_cores: float | None = None


@dataclass
class Presence:
    """What the registry made of the robots' heartbeats during a run (see `PresenceWatch`)."""

    samples: int = 0
    unanswered: int = 0  # samples whose listing did not come back in time
    oldest_heartbeat_s: float = 0.0  # the largest age of a robot's last recorded heartbeat seen
    lost: list[str] = field(default_factory=list)  # robots seen not online (Unresponsive, Disconnected)
    jobs_ended: list[str] = field(default_factory=list)  # robots whose job was no longer Running at the end
    # After the run, how long the registry took to handle the heartbeats left waiting (None: not within
    # CATCH_UP_TIMEOUT_S).
    caught_up_s: float | None = None


@dataclass
class Run:
    """One mode's fetches, from the first request sent to the last reply."""

    mode: str
    loop: str  # closed: every robot back to back; single: one robot alone; paced: due at a fixed rate
    fetches: int
    seconds: float
    fetches_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    mismatches: int  # a value not the one set, or a box that did not open
    errors: int  # requests refused or unanswered
    error_codes: dict[str, int]
    first_error: str | None
    cpu: Cpu
    offered_per_s: float | None = None  # paced: the rate the fetches were due at
    late_sends: int = 0  # paced: fetches sent over 1 ms after their time (the robot's previous one was out)
    unsent: int = 0  # paced: fetches not sent at all, PACED_GRACE_S after the last was due
    presence: Presence = field(default_factory=Presence)


@dataclass
class Crypto:
    """The sealing step alone, µs per operation (the best of CRYPTO_ROUNDS rounds)."""

    ops: int
    ring_seal_us: float  # `KeyRing.seal`: a credential stored
    ring_open_us: float  # `KeyRing.open`: the stored secret read, once per fetch
    box_seal_us: float  # `sealing.seal`: sealed to the robot's key, in the service
    box_open_us: float  # `sealing.open_sealed`: opened by the robot
    per_fetch_us: float  # ring.open + public key from text + seal + box as text and back + open


@dataclass
class Result:
    """The measurements on one database."""

    database: str
    runs: dict[str, Run]  # closed loop, every robot, by mode
    single: dict[str, Run]  # one robot, one fetch at a time, by mode
    paced: Run | None
    crypto: Crypto
    setup_s: float  # services started, robots added, connected, keyed, their jobs Running

    def every_run(self) -> list[tuple[str, Run]]:
        """Every run, by a name for the report."""
        return [
            *self.runs.items(),
            *((f"{mode}, single", run) for mode, run in self.single.items()),
            *([("sealed, paced", self.paced)] if self.paced is not None else []),
        ]


def cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU seconds a process has used so far (Linux's /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy so far, all cores (Linux's /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU time of this process, the services' process and nats-server between start and `per_fetch`,
    and what the rest of the machine used meanwhile."""

    def __init__(self, services_pid: int | None, nats_pid: int | None) -> None:
        self._pids = (services_pid, nats_pid)
        self._wall = time.perf_counter()
        self._caller = time.process_time()
        self._others = [cpu_seconds(pid) for pid in self._pids]
        self._machine = machine_busy_seconds()

    def per_fetch(self, fetches: int) -> Cpu:
        caller = time.process_time() - self._caller
        spent = [
            None if before is None or (after := cpu_seconds(pid)) is None else after - before
            for before, pid in zip(self._others, self._pids, strict=True)
        ]
        machine = machine_busy_seconds()
        other_cores = None
        if machine is not None and self._machine is not None and None not in spent:
            rest = machine - self._machine - caller - sum(x for x in spent if x is not None)
            other_cores = round(max(0.0, rest) / (time.perf_counter() - self._wall), 2)
        services, nats = (None if x is None else round(x / fetches * 1e6, 1) for x in spent)
        return Cpu(
            caller_us=round(caller / fetches * 1e6, 1),
            services_us=services,
            nats_us=nats,
            other_cores=other_cores,
        )


def ms(ordered: list[int], fraction: float) -> float:
    """A percentile of sorted nanoseconds, in milliseconds."""
    return round(percentile(ordered, fraction) / 1e6, 2) if ordered else 0.0


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` shares that differ by one at most."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


# --- the robots ---


class Robot:
    """One simulated robot: its own token and connection, online as an agent keeps it, with a sealing
    key registered and a job it runs (it acknowledges the start and never runs anything)."""

    def __init__(self, name: str, client: Client, session: str) -> None:
        self.name = name
        self.client = client
        self.session = session
        self.key = X25519PrivateKey.generate()
        self.job: StartCommand | None = None
        self.job_started = asyncio.Event()
        self._beating: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, nats_url: str, name: str, token: str) -> Robot:
        """Connect as the robot, listen for its commands, start its session and its heartbeats, and
        register its sealing key."""
        nc = await connect(nats_url, name=f"bench-robot-{name}", credentials=Credentials(token=token))
        robot = cls(name, Client(nc, token=token, timeout=REQUEST_TIMEOUT_S), uuid.uuid4().hex[:16])
        try:
            # Before the session starts: the jobs service sends a start as soon as the robot is online.
            await nc.subscribe(subjects.command_listen(robot.client.tenant, name), cb=robot._on_command)
            await nc.flush()
            await robot.client.request(
                RobotConnect(robot=name, session=robot.session, heartbeat_interval_s=HEARTBEAT_INTERVAL_S)
            )
            robot._beating = asyncio.ensure_future(robot._heartbeat_forever())
            await robot.client.request(RobotKeySet(public_key=sealing.public_text(robot.key.public_key())))
        except BaseException:
            await robot.close()
            raise
        return robot

    async def _on_command(self, msg: Msg) -> None:
        """Acknowledge every command of this session as an agent does; note the start of its job."""
        with contextlib.suppress(HerderError):
            command = codec.load(Command, msg.data, codec.content_type_of(msg.headers)).command
            if isinstance(command, RemovedCommand) or command.session != self.session:
                return
            ack = CommandAck(job_id=command.job_id, attempt=command.attempt, session=self.session)
            if msg.reply:
                await self.client.nc.publish(msg.reply, codec.dump(ack))
            if isinstance(command, StartCommand) and self.job is None:
                self.job = command
                self.job_started.set()
                await self._beat()  # busy with it, as an agent says at once

    async def _beat(self) -> None:
        job = self.job.job_id if self.job is not None else None
        beat = Heartbeat(session=self.session, interval_s=HEARTBEAT_INTERVAL_S, current_job=job, sent_at=utcnow())
        with contextlib.suppress(Exception):  # a heartbeat lost now is followed by the next one
            await self.client.nc.publish(subjects.heartbeat(self.client.tenant, self.name), codec.dump(beat))

    async def _heartbeat_forever(self) -> None:
        while True:
            await self._beat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    @property
    def job_id(self) -> str:
        assert self.job is not None, f"robot {self.name} runs no job yet"
        return self.job.job_id

    async def close(self) -> None:
        """Report the job Successful, stop heartbeating, end the session and close the connection."""
        if self.job is not None:
            with contextlib.suppress(Exception):
                await self.client.request(
                    JobReport(job_id=self.job.job_id, attempt=self.job.attempt, outcome=Outcome.SUCCESSFUL),
                    timeout=5.0,
                )
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
        with contextlib.suppress(Exception):
            await self.client.request(RobotGoodbye(session=self.session), timeout=5.0)
        await self.client.nc.close()


async def start_robots(nats_url: str, admin: Client, count: int) -> list[Robot]:
    """Add `count` robots and connect each through the fence with its own token, a few at a time."""
    tokens = []
    for index in range(count):
        name = f"bench-{index:03d}"
        added = await admin.request(RobotAdd(name=name, type=RobotType.UNATTENDED, host="bench"))
        tokens.append((name, added.token))
    robots: list[Robot] = []
    for start in range(0, count, 10):
        robots += await asyncio.gather(
            *(Robot.connect(nats_url, name, token) for name, token in tokens[start : start + 10])
        )
    return robots


async def start_jobs(admin: Client, robots: list[Robot]) -> None:
    """One job per robot, aimed at it; until each robot holds its start and the job is Running."""
    jobs = {robot.name: (await admin.request(JobStart(process=PROCESS, robot=robot.name))).id for robot in robots}
    deadline = time.monotonic() + JOBS_RUNNING_TIMEOUT_S
    waiting = list(robots)
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(waiting)} robots did not get their job Running (first: {waiting[0].name})")
        still = []
        for robot in waiting:
            if robot.job is None:
                still.append(robot)
                continue
            if robot.job.job_id != jobs[robot.name]:
                raise RuntimeError(f"robot {robot.name} was given job {robot.job.job_id}, not {jobs[robot.name]}")
            state = (await admin.request(JobShow(id=robot.job.job_id))).state
            if state is not JobState.RUNNING:
                raise RuntimeError(f"job {robot.job.job_id} of robot {robot.name} is {state.value}, not Running")
        waiting = still
        if waiting:
            await asyncio.sleep(POLL_S)


# --- the fetches ---


Fetch = Callable[[Robot], Awaitable[bool]]  # one fetch by `robot`: whether it brought the right value


def fetcher(mode: str, secret: bytes) -> Fetch:
    """One fetch of `mode`, as a robot does it, up to the value in hand and checked."""
    if mode == "sealed":

        async def sealed(robot: Robot) -> bool:
            job_id = robot.job_id
            reply = await robot.client.request(CredentialFetch(name=CREDENTIAL, job_id=job_id))
            context = sealing.context(*credential_fetch_context(robot.client.tenant, robot.name, job_id, CREDENTIAL))
            try:
                opened = sealing.open_sealed(robot.key, sealing.Sealed.from_text(reply.sealed_secret), context)
            except sealing.SealError:
                return False
            return opened == secret and reply.username == USERNAME

        return sealed

    async def unsealed(robot: Robot) -> bool:
        reply = await robot.client.request(AssetGet(name=ASSET))
        return bool(reply.value == ASSET_VALUE)

    return unsealed


@dataclass
class Tally:
    """What the fetches of one run came to."""

    latencies: list[int] = field(default_factory=list)
    mismatches: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_error: str | None = None
    late: int = 0
    unsent: int = 0
    last: float = 0.0

    @property
    def done(self) -> int:
        """Fetches answered, rightly or not."""
        return len(self.latencies) + sum(self.errors.values())

    async def one(self, fetch: Fetch, robot: Robot, since_ns: int) -> None:
        """One fetch, its latency counted from `since_ns`."""
        try:
            right = await fetch(robot)
        except HerderError as exc:
            self.errors[exc.code.value] += 1
            self.first_error = self.first_error or f"{exc.code.value}: {exc.message}"
            return
        finally:
            self.last = time.perf_counter()
        self.latencies.append(time.perf_counter_ns() - since_ns)
        if not right:
            self.mismatches += 1


async def closed_loop(robots: list[Robot], fetch: Fetch, fetches: int) -> tuple[Tally, float]:
    """`fetches` fetches, each robot its share back to back; the tally, and the first send (perf_counter)."""
    tally = Tally()

    async def loop(robot: Robot, share: int) -> None:
        for _ in range(share):
            await tally.one(fetch, robot, time.perf_counter_ns())

    began = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(
            *(loop(robot, share) for robot, share in zip(robots, shares(fetches, len(robots)), strict=True))
        ),
        RUN_TIMEOUT_S,
    )
    return tally, began


async def paced_loop(robots: list[Robot], fetch: Fetch, fetches: int, rate: float) -> tuple[Tally, float]:
    """`fetches` fetches due at `rate` per second in all, the robots' times interleaved, one in flight
    per robot; each latency counts from its due time. A fetch still unsent PACED_GRACE_S after the
    last one was due is not sent (the run lasts its schedule, not what a saturated service makes of it)."""
    tally = Tally()
    interval = len(robots) / rate  # between two fetches of one robot
    began = time.perf_counter()
    origin = time.perf_counter_ns()
    give_up = origin + int((fetches / rate + PACED_GRACE_S) * 1e9)

    async def loop(index: int, robot: Robot, share: int) -> None:
        for n in range(share):
            due = origin + int((index / len(robots) + n) * interval * 1e9)
            now = time.perf_counter_ns()
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
            elif now > give_up:
                tally.unsent += share - n
                return
            elif now - due > LATE_NS:
                tally.late += 1
            await tally.one(fetch, robot, due)

    counts = shares(fetches, len(robots))
    await asyncio.wait_for(
        asyncio.gather(*(loop(index, robot, counts[index]) for index, robot in enumerate(robots))), RUN_TIMEOUT_S
    )
    return tally, began


def run_of(mode: str, loop: str, fetches: int, tally: Tally, began: float, cpu: Cpu, presence: Presence) -> Run:
    """The figures of a run (latencies of the fetches that were answered without an error)."""
    seconds = max(tally.last - began, 1e-9)
    ordered = sorted(tally.latencies)
    return Run(
        mode=mode,
        loop=loop,
        fetches=fetches,
        seconds=round(seconds, 3),
        fetches_per_s=round(len(ordered) / seconds, 1),
        p50_ms=ms(ordered, 0.5),
        p99_ms=ms(ordered, 0.99),
        mean_ms=round(sum(ordered) / len(ordered) / 1e6, 2) if ordered else 0.0,
        max_ms=round(ordered[-1] / 1e6, 2) if ordered else 0.0,
        mismatches=tally.mismatches,
        errors=sum(tally.errors.values()),
        error_codes=dict(tally.errors),
        first_error=tally.first_error,
        cpu=cpu,
        late_sends=tally.late,
        unsent=tally.unsent,
        presence=presence,
    )


class PresenceWatch:
    """The registry's view of the robots while a run goes on, every WATCH_S: how old the newest heartbeat
    it has recorded of each robot is, and which robots it no longer holds online. The registry records
    a heartbeat when it has handled it: an age beyond the interval is a heartbeat waiting to be handled,
    and past MISSED_HEARTBEATS intervals the robot is declared Unresponsive (its job ends Faulted)."""

    def __init__(self, admin: Client, robots: list[Robot]) -> None:
        self._admin = admin
        self._robots = robots
        self._names = {robot.name for robot in robots}
        self.presence = Presence()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PresenceWatch:
        self._task = asyncio.ensure_future(self._watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._look()  # once more at the end
        for robot in self._robots:
            state = (await self._admin.request(JobShow(id=robot.job_id))).state
            if state is not JobState.RUNNING:
                self.presence.jobs_ended.append(robot.name)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            await self._look()

    async def _look(self) -> None:
        view = await registry_view(self._admin, self._names)
        if view is None:
            self.presence.unanswered += 1
            return
        oldest, offline = view
        self.presence.samples += 1
        self.presence.oldest_heartbeat_s = round(max(self.presence.oldest_heartbeat_s, oldest), 1)
        self.presence.lost += [name for name in offline if name not in self.presence.lost]

    async def caught_up(self) -> None:
        """Until the registry has handled the heartbeats the run left waiting (the oldest it recorded is
        no older than an interval and a little): the next run starts from a registry that keeps up."""
        started = time.perf_counter()
        while time.perf_counter() - started < CATCH_UP_TIMEOUT_S:
            view = await registry_view(self._admin, self._names)
            if view is not None and view[0] < HEARTBEAT_INTERVAL_S + CATCH_UP_SLACK_S:
                self.presence.caught_up_s = round(time.perf_counter() - started, 1)
                return
            await asyncio.sleep(CATCH_UP_POLL_S)


async def registry_view(admin: Client, names: set[str]) -> tuple[float, list[str]] | None:
    """The age (s) of the oldest heartbeat the registry recorded of the robots `names`, and those of
    them it does not hold online; None if it did not answer in time."""
    try:
        listed = (await admin.request(RobotListRequest(), timeout=WATCH_TIMEOUT_S)).robots
    except HerderError:
        return None
    now = utcnow()
    mine = [robot for robot in listed if robot.name in names]
    ages = [(now - robot.last_heartbeat).total_seconds() for robot in mine if robot.last_heartbeat is not None]
    return max(ages, default=0.0), [robot.name for robot in mine if not robot.status.online]


# --- the sealing step alone ---


def best_us(operation: Callable[[], object], ops: int) -> float:
    """µs per call of `operation`, the best of CRYPTO_ROUNDS rounds of `ops` calls."""
    best = float("inf")
    for _ in range(CRYPTO_ROUNDS):
        started = time.perf_counter_ns()
        for _ in range(ops):
            operation()
        best = min(best, (time.perf_counter_ns() - started) / ops)
    return round(best / 1e3, 2)


def measure_crypto(ops: int, secret: bytes) -> Crypto:
    """The crypto of storing and of fetching a credential, in this process, without the bus."""
    ring = KeyRing({1: os.urandom(32)}, 1)
    at_rest = at_rest_context(subjects.DEFAULT_TENANT, CREDENTIAL, Scope())
    stored = ring.seal(secret, at_rest)
    robot_key = X25519PrivateKey.generate()
    robot_public = robot_key.public_key()
    robot_text = sealing.public_text(robot_public)
    context = sealing.context(*credential_fetch_context(subjects.DEFAULT_TENANT, "bench-000", "0" * 32, CREDENTIAL))
    box = sealing.seal(robot_public, secret, context)

    def one_fetch() -> None:
        plain = ring.open(stored, at_rest)
        text = sealing.seal(sealing.public_from_text(robot_text), plain, context).text()
        if sealing.open_sealed(robot_key, sealing.Sealed.from_text(text), context) != secret:
            raise AssertionError("the sealed secret did not come back as it went")

    one_fetch()
    return Crypto(
        ops=ops,
        ring_seal_us=best_us(lambda: ring.seal(secret, at_rest), ops),
        ring_open_us=best_us(lambda: ring.open(stored, at_rest), ops),
        box_seal_us=best_us(lambda: sealing.seal(robot_public, secret, context), ops),
        box_open_us=best_us(lambda: sealing.open_sealed(robot_key, box, context), ops),
        per_fetch_us=best_us(one_fetch, ops),
    )


# --- one database ---


async def run_database(
    database: str, db_url: str, server: EmbeddedNats, root: Path, args: argparse.Namespace
) -> Result:
    began = time.perf_counter()
    services, token = await Child.start("services", SERVICES_FLAG, server.url, db_url, str(root / "services"))
    nc = await connect(server.url, name="bench-admin", credentials=Credentials(token=token))
    robots: list[Robot] = []
    try:
        admin = Client(nc, token=token, timeout=REQUEST_TIMEOUT_S)
        await publish_folder(nc, admin, noop_package(root, "command"))
        robots = await start_robots(server.url, admin, args.robots)
        await start_jobs(admin, robots)
        secret = f"s3cret-{uuid.uuid4().hex}".encode()
        await set_credential(admin, CREDENTIAL, USERNAME, secret.decode())
        await admin.request(AssetSet(name=ASSET, type=AssetType.TEXT, value=ASSET_VALUE))
        setup_s = time.perf_counter() - began
        pids = (services.process.pid, server.pid)
        fetchers = {mode: fetcher(mode, secret) for mode in MODES}
        if args.warmup:
            for mode in MODES:
                tally, _ = await closed_loop(robots, fetchers[mode], args.warmup)
                if tally.errors or tally.mismatches:
                    raise RuntimeError(
                        f"warmup, {mode}: {sum(tally.errors.values())} errors ({tally.first_error}), "
                        f"{tally.mismatches} mismatches"
                    )

        async def timed(mode: str, loop: str, fetches: int, run: Awaitable[tuple[Tally, float]]) -> Run:
            meter = CpuMeter(*pids)
            async with PresenceWatch(admin, robots) as watch:
                tally, started = await run
                cpu = meter.per_fetch(max(1, tally.done))
            await watch.caught_up()
            return run_of(mode, loop, fetches, tally, started, cpu, watch.presence)

        runs: dict[str, Run] = {}
        for mode in MODES:
            runs[mode] = await timed(mode, "closed", args.fetches, closed_loop(robots, fetchers[mode], args.fetches))
        single: dict[str, Run] = {}
        one_at_a_time = min(args.fetches, SINGLE_FETCHES)
        # A robot whose job still runs, should the registry have lost some (see `PresenceWatch`).
        ended = {name for run in runs.values() for name in run.presence.jobs_ended}
        alone = next((robot for robot in robots if robot.name not in ended), robots[0])
        for mode in MODES:
            single[mode] = await timed(
                mode, "single", one_at_a_time, closed_loop([alone], fetchers[mode], one_at_a_time)
            )
        paced = None
        if args.paced_rate:
            paced = await timed(
                "sealed", "paced", args.fetches, paced_loop(robots, fetchers["sealed"], args.fetches, args.paced_rate)
            )
            paced.offered_per_s = float(args.paced_rate)
        crypto = await asyncio.to_thread(measure_crypto, args.crypto_ops, secret)
        return Result(
            database=database, runs=runs, single=single, paced=paced, crypto=crypto, setup_s=round(setup_s, 2)
        )
    finally:
        await asyncio.gather(*(robot.close() for robot in robots))
        await nc.close()
        await services.stop()


async def measure(args: argparse.Namespace, server: EmbeddedNats, root: Path, env: dict[str, Any]) -> list[Result]:
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
                env["postgres"] = postgres_version(url)
                results.append(await run_database(database, url, server, folder, args))
        except ImportError:
            raise
        except Exception as exc:
            if args.db == "postgres":
                raise
            print(f"PostgreSQL skipped: {exc}", file=sys.stderr)
    return results


def postgres_version(url: str) -> str:
    """The server's version and commit setting."""
    import psycopg

    with psycopg.connect(url, connect_timeout=3) as connection:
        row = connection.execute(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit')"
        ).fetchone()
    assert row is not None
    return f"PostgreSQL {row[0]} (synchronous_commit {row[1]})"


# --- the report ---


def targets(results: list[Result]) -> dict[str, tuple[bool, str]]:
    """Each target's verdict and the figure it was judged on."""
    found: dict[str, tuple[bool, str]] = {}
    for result in results:
        sealed = result.runs["sealed"]
        found[f"sealed p50 < {TARGET_P50_MS:g} ms, {result.database}, closed loop"] = (
            sealed.errors == 0 and sealed.p50_ms < TARGET_P50_MS,
            f"{sealed.p50_ms:.2f} ms{_errors(sealed)}",
        )
        paced = result.paced
        if paced is not None:
            kept_up = paced.unsent == 0
            figure = f"{paced.p50_ms:.2f} ms" + (
                "" if kept_up else f"; fell behind: {paced.unsent:,} of {paced.fetches:,} fetches not sent"
            )
            found[
                f"sealed p50 < {TARGET_P50_MS:g} ms, {result.database}, paced at {paced.offered_per_s or 0:,.0f}/s"
            ] = (
                kept_up and paced.errors == 0 and paced.p50_ms < TARGET_P50_MS,
                figure + _errors(paced),
            )
        found[f"sealed >= {TARGET_FETCHES_PER_S:,.0f} fetches/s, {result.database}, closed loop"] = (
            sealed.errors == 0 and sealed.fetches_per_s >= TARGET_FETCHES_PER_S,
            f"{sealed.fetches_per_s:,.0f} fetches/s{_errors(sealed)}",
        )
    wrong = sum(run.mismatches + run.errors for result in results for _, run in result.every_run())
    found[f"mismatches and errors == {TARGET_MISMATCHES}, every run"] = (wrong == TARGET_MISMATCHES, str(wrong))
    return found


def _errors(run: Run) -> str:
    return f"; {run.errors:,} of {run.fetches:,} fetches refused or unanswered" if run.errors else ""


def _cpu(cpu: Cpu) -> str:
    def shown(value: float | None) -> str:
        return f"{value:>7.0f}" if value is not None else f"{'-':>7}"

    return f"{shown(cpu.caller_us)} {shown(cpu.services_us)} {shown(cpu.nats_us)}"


def _run_line(database: str, mode: str, r: Run) -> str:
    return (
        f"  {database:<9} {mode:<9} {r.fetches_per_s:>9.0f} {r.seconds:>8.2f} {r.p50_ms:>7.2f} ms "
        f"{r.p99_ms:>7.2f} ms {r.mean_ms:>7.2f} ms {r.max_ms:>7.1f} ms {r.mismatches:>6} {r.errors:>6}"
    )


def render(results: list[Result], args: argparse.Namespace, env: dict[str, Any]) -> str:
    load = env.get("load_average_at_start", [])
    header = (
        f"  {'database':<9} {'mode':<9} {'fetches/s':>9} {'seconds':>8} {'p50':>10} {'p99':>10} {'mean':>10} "
        f"{'max':>10} {'wrong':>6} {'errors':>6}"
    )
    lines = [
        f"Secrets: credential fetches from {args.robots} simulated robots (a connection and a job each), "
        f"{args.fetches} fetches per run, after {args.warmup} untimed per mode",
        f"  Python {env['python']}, nats-py {env['nats_py']}, SQLAlchemy {env['sqlalchemy']}, "
        f"cryptography {env['cryptography']}, {env['nats_server']}, {env.get('postgres', 'PostgreSQL not used')}",
        f"  {env['cpus']} CPUs, load average at start {' / '.join(f'{x:.2f}' for x in load)} (1 / 5 / 15 min), "
        f"at end {' / '.join(f'{x:.2f}' for x in env.get('load_average_at_end', []))}",
        *(
            f"  {result.database}: set-up {result.setup_s:.1f} s (services started, robots added and connected, "
            "keys registered, jobs Running, credential and asset set)"
            for result in results
        ),
        "",
        f"  closed loop: each robot one request in flight, back to back ({args.robots} in flight in all);",
        "  latency from the request sent to the value in hand (sealed: the box opened on the robot)",
        header,
    ]
    for result in results:
        lines += [_run_line(result.database, mode, r) for mode, r in result.runs.items()]
    lines += [f"    {mode}: {label}" for mode, label in MODE_LABELS.items()]
    lines += [
        "",
        f"  one at a time: one robot, one request in flight ({min(args.fetches, SINGLE_FETCHES)} fetches per mode):",
        "  a fetch that waits for no other",
        header,
    ]
    for result in results:
        lines += [_run_line(result.database, mode, r) for mode, r in result.single.items()]
    paced = [(result, result.paced) for result in results if result.paced is not None]
    if paced:
        lines += [
            "",
            f"  paced: sealed fetches due at {args.paced_rate:,.0f}/s in all ({args.paced_rate / args.robots:g}/s per "
            "robot, interleaved, one in flight per robot);",
            f"  latency from the time each was due; none sent later than {PACED_GRACE_S:g} s after the last was due",
            f"  {'database':<9} {'due/s':>7} {'fetches/s':>9} {'p50':>10} {'p99':>10} {'mean':>10} {'max':>10} "
            f"{'late':>6} {'unsent':>7} {'wrong':>6} {'errors':>6}",
        ]
        for result, p in paced:
            lines.append(
                f"  {result.database:<9} {p.offered_per_s or 0:>7.0f} {p.fetches_per_s:>9.0f} {p.p50_ms:>7.2f} ms "
                f"{p.p99_ms:>7.2f} ms {p.mean_ms:>7.2f} ms {p.max_ms:>7.1f} ms {p.late_sends:>6} {p.unsent:>7} "
                f"{p.mismatches:>6} {p.errors:>6}"
            )
    lines += [
        "",
        "  CPU per fetch (µs): this process (the robots), the services' process, nats-server; and the share",
        "  of one core the services' process used over the run (it runs on one event loop); and the cores the",
        "  rest of the machine kept busy meanwhile, on average (the database server's share is there too)",
        f"  {'database':<9} {'run':<17} {'caller':>7} {'service':>7} {'nats':>7} {'service busy':>13} "
        f"{'other cores':>12}",
    ]
    for result in results:
        for name, r in result.every_run():
            busy = f"{r.cpu.services_us * r.fetches_per_s / 1e4:>12.0f}%" if r.cpu.services_us is not None else " " * 13
            other = f"{r.cpu.other_cores:>12.2f}" if r.cpu.other_cores is not None else f"{'-':>12}"
            lines.append(f"  {result.database:<9} {name:<17} {_cpu(r.cpu)} {busy} {other}")
    lines += [
        "",
        f"  the registry's view of the robots during each run (every {WATCH_S:g} s): the age of the oldest last",
        f"  heartbeat it recorded (a robot heartbeats every {HEARTBEAT_INTERVAL_S:g} s; at "
        f"{MISSED_HEARTBEATS * HEARTBEAT_INTERVAL_S:g} s it is Unresponsive and its job Faulted),",
        "  the robots it did not hold online when it was asked, and the robots whose job was no longer Running",
        "  at the end of the run (every robot's, for the runs on all robots); then how long after the run the",
        f"  registry took to catch up (the oldest heartbeat under {HEARTBEAT_INTERVAL_S + CATCH_UP_SLACK_S:g} s) "
        "before the next run began",
        f"  {'database':<9} {'run':<17} {'oldest heartbeat':>16} {'robots lost':>11} {'jobs ended':>10} "
        f"{'caught up':>10} {'samples':>8}",
    ]
    for result in results:
        for name, r in result.every_run():
            w = r.presence
            caught = f"{w.caught_up_s:>8.1f} s" if w.caught_up_s is not None else f"{'no':>10}"
            lines.append(
                f"  {result.database:<9} {name:<17} {w.oldest_heartbeat_s:>14.1f} s {len(w.lost):>11} "
                f"{len(w.jobs_ended):>10} {caught} {w.samples:>8}"
            )
    lines += [
        "",
        f"  the sealing step alone, in this process (µs per operation, best of {CRYPTO_ROUNDS} x {args.crypto_ops})",
        f"  {'database':<9} {'ring.seal':>10} {'ring.open':>10} {'box seal':>10} {'box open':>10} {'per fetch':>10}"
        f" {'of single sealed p50':>21}",
    ]
    for result in results:
        c = result.crypto
        p50_us = result.single["sealed"].p50_ms * 1e3
        share = f"{c.per_fetch_us / p50_us * 100:>20.1f}%" if p50_us else f"{'-':>21}"
        lines.append(
            f"  {result.database:<9} {c.ring_seal_us:>10.1f} {c.ring_open_us:>10.1f} {c.box_seal_us:>10.1f} "
            f"{c.box_open_us:>10.1f} {c.per_fetch_us:>10.1f} {share}"
        )
    lines += [
        "    ring: the master key's envelope (seal: a credential stored; open: once per fetch); box: sealed to the",
        "    robot's key (seal: in the service; open: on the robot); per fetch: ring.open + the robot's key from its",
        "    text + box seal + the box to text and back + box open",
        "",
    ]
    for result in results:
        for name, run in result.every_run():
            if run.first_error:
                lines.append(f"  {result.database} {name}: first error {run.first_error}")
    for name, (met, figure) in targets(results).items():
        lines.append(f"  target {name}: {'met' if met else 'NOT met'} ({figure})")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="sqlite", help="(%(default)s)")
    parser.add_argument("--robots", type=int, default=DEFAULT_ROBOTS, help="simulated robots (%(default)s)")
    parser.add_argument("--fetches", type=int, default=DEFAULT_FETCHES, help="fetches per run (%(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed fetches per mode (%(default)s)")
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=DEFAULT_PACED_RATE,
        help="sealed fetches per second in the paced run; 0: no paced run (%(default)s)",
    )
    parser.add_argument(
        "--crypto-ops",
        type=int,
        default=DEFAULT_CRYPTO_OPS,
        help="operations per round of the crypto timing (%(default)s)",
    )
    args = parser.parse_args(argv)
    for option in ("robots", "fetches", "crypto_ops"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.paced_rate < 0:
        parser.error("--paced-rate must not be negative")
    return args


def main(argv: list[str]) -> int:
    logs.configure(level="warning")
    args = parse_args(argv)
    env = environment()
    env["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    env["cryptography"] = metadata.version("cryptography")
    with tempfile.TemporaryDirectory(prefix="herder-bench-") as folder:
        root = Path(folder)
        credential = ServiceCredential.generate()
        credential.write(credential_file(root))
        server = EmbeddedNats(root / "nats", credential=credential)
        server.start()
        try:
            results = asyncio.run(measure(args, server, root, env))
        finally:
            server.stop()
    env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        document = {
            "benchmark": "credential_fetch",
            "targets": {
                "sealed_p50_ms": TARGET_P50_MS,
                "sealed_fetches_per_s": TARGET_FETCHES_PER_S,
                "mismatches": TARGET_MISMATCHES,
            },
            "targets_met": {name: met for name, (met, _) in targets(results).items()},
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
