"""Work queues: how many items a fleet of robots gets through, herder against pgqueuer on one PostgreSQL.

Run it with `make bench` or `.venv/bin/python tests/bench/bench_queues.py [--db sqlite|postgres|both]
[--items N] [--consumers N] [--batch N] [--warmup N] [--pgqueuer-driver psycopg|asyncpg] [--json]`.

One isolated nats-server is started (herder's `EmbeddedNats`, temporary store, fenced) and, for
each database, herder's services run in a child process (the one `bench_dispatch.py` starts, every
service in one `ServiceHost`) on a fresh SQLite file (as herder sets it up: WAL, synchronous=NORMAL)
or a fresh PostgreSQL database (from HERDER_TEST_POSTGRES; `synchronous_commit` left as the server
has it, on by default: every commit waits for its WAL flush; the report shows the setting).

This process holds the consumers: CONSUMERS robots, each registered with its own token and on the
bus through its own connection, online as a robot agent keeps itself (`robot_connect`, then a
heartbeat on its telemetry subject every interval), so the queues service never takes their items
back. An admin client adds the items.

It measures, per database, after WARMUP untimed items (batch mode, a queue of their own):

1. the full item cycle through the bus: ITEMS items added in bulk to a new queue (`item_add`,
   ADD_BATCH per request, one adder) while the consumers take them (`item_next`) and finish them
   (`item_result`, Successful). Two modes: `single` (one item per `item_next`, one result per
   `item_result`) and `batch` (up to BATCH items per `item_next`, all their results in one
   `item_result`). Items per second from the first add request sent to the last result answered;
   the p50/p99 of the `item_next` requests that brought items and of the `item_result` requests.
   A consumer that finds the queue empty asks again EMPTY_POLL_S later, and stops when it finds it
   empty after the last add was answered. Every id handed out is counted: one handed out twice (to
   two consumers, or to one twice) is a double claim. At the end `queue_show` must say Successful
   == ITEMS, with nothing left New or InProgress. The CPU time this process, the services' process
   and nats-server spent per item says where the work went (the database server's is not counted).
2. adding alone: ITEMS items added to a new queue with no consumer, ADD_BATCH per request, one
   request at a time; items per second and the p50/p99 of the requests.

On PostgreSQL the same run measures pgqueuer on the same server, in a database of its own with its
schema installed by its own API (`Queries.install`: durable, logged tables), after herder in each
mode so that a change of load on the machine hits both alike. It runs as its authors drive it in
their own benchmark (`tools/benchmark.py`): CONSUMERS `QueueManager`s, each on its own connection,
with a no-op entrypoint, run with `batch_size` 1 (single) or BATCH (batch) and pgqueuer's other
defaults (LISTEN/NOTIFY wake-ups, acks through its status-log buffer, heartbeats, no cap on a
worker's jobs in flight). `QueueManager` rather than its `Queries` directly, because that is what a
pgqueuer user runs: the manager's dequeue loop, buffered acks and bookkeeping are part of its cost,
as herder's service and bus are part of herder's. One producer enqueues the same number of jobs with
the same payloads, ADD_BATCH per `enqueue` call; the span runs from the first enqueue to the commit
of the last ack (the `log_jobs` write that moves a job from its queue table to its log). Each job
handed to an entrypoint is counted, as herder's items are. Its adding alone is timed too. The ratios
herder/pgqueuer compare items per second in each mode.

pgqueuer's driver is psycopg by default, the driver herder itself uses; `--pgqueuer-driver asyncpg`
takes asyncpg, pgqueuer's own default, when it is installed (it is not one of herder's dependencies).
On psycopg, pgqueuer's LISTEN watcher holds its connection for up to a second while no NOTIFY comes,
which shows in small runs (a worker's next dequeue waits for it) and hardly in the default one.

Targets: herder/pgqueuer ≥ TARGET_RATIO in both modes; TARGET_BATCH_ITEMS_PER_S items/s on PostgreSQL
with batches; no double claim. The machine's load average at the start (and end) is printed:
another run on the machine shows there. The script reports whether each target is met and exits 0
either way on a completed run: it measures, it does not test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
from bench_dispatch import SERVICES_FLAG, Child, credential_file, postgres_database
from benchlib import environment, percentile
from pgqueuer import QueueManager
from pgqueuer.db import AsyncpgDriver, PsycopgDriver
from pgqueuer.domain.models import TracebackRecord
from pgqueuer.domain.types import JOB_STATUS
from pgqueuer.errors import FailingListenerError
from pgqueuer.models import Job
from pgqueuer.queries import Queries

from herder.client import logs
from herder.client.connection import Credentials, connect
from herder.client.requests import Client
from herder.protocol import codec, subjects
from herder.protocol.errors import Conflict
from herder.protocol.messages import utcnow
from herder.protocol.queues import (
    MAX_ITEMS_PER_NEXT,
    MAX_RESULTS_PER_REQUEST,
    ItemAdd,
    ItemNext,
    ItemResult,
    ItemResultRequest,
    ItemState,
    NewItem,
    QueueChoice,
    QueueCreate,
    QueueShow,
)
from herder.protocol.registry import Heartbeat, RobotAdd, RobotConnect, RobotGoodbye, RobotType
from herder.services.common.credentials import ServiceCredential
from herder.services.common.natsserver import EmbeddedNats

TARGET_RATIO = 1.0
TARGET_BATCH_ITEMS_PER_S = 5000.0
TARGET_DOUBLE_CLAIMS = 0
DEFAULT_ITEMS = 10_000
DEFAULT_CONSUMERS = 16
DEFAULT_BATCH = 50
DEFAULT_WARMUP = 500
ADD_BATCH = 1000  # items per `item_add` request, jobs per pgqueuer `enqueue` call
HEARTBEAT_INTERVAL_S = 5.0  # the robot agent's default
# A consumer that found the queue empty asks again after this pause (the items may not be added yet).
EMPTY_POLL_S = 0.02
REQUEST_TIMEOUT_S = 60.0
CYCLE_TIMEOUT_S = 600.0
WORKER_START_TIMEOUT_S = 60.0
PGQ_ENTRYPOINT = "bench_item"
PGQ_ADD_ONLY_ENTRYPOINT = "bench_add_only"  # no worker takes these
CONFIG_KEYS = ("items", "consumers", "batch", "warmup", "pgqueuer_driver")
MODES = ("single", "batch")


# --- measurements ---


@dataclass
class Cpu:
    """CPU time spent during a measurement, per item, by process (None: not readable here)."""

    caller_us: float  # this process: the consumers, the adder (and pgqueuer's workers, in its runs)
    services_us: float | None = None
    nats_us: float | None = None


@dataclass
class Cycle:
    """herder's full item cycle: added in bulk while the consumers take and finish the items."""

    mode: str
    count: int  # items asked for per `item_next`
    items: int
    seconds: float
    items_per_s: float
    add_seconds: float  # from the first add sent to the last one answered, while consumers work
    next_requests: int  # `item_next` requests that brought items
    next_empty: int  # and those that found nothing to take
    next_p50_ms: float
    next_p99_ms: float
    result_requests: int
    result_p50_ms: float
    result_p99_ms: float
    double_claims: int  # handouts of an id beyond its first
    unfinished: int  # ids added and not finished by the end
    refused_results: int  # results refused with `conflict` (the item was no longer the consumer's)
    successful: int  # as `queue_show` counts them at the end
    left_open: int  # New or InProgress, as `queue_show` counts them at the end
    cpu: Cpu


@dataclass
class Adding:
    """Items added with no consumer at work."""

    items: int
    requests: int
    seconds: float
    items_per_s: float
    request_p50_ms: float
    request_p99_ms: float


@dataclass
class PgqCycle:
    """pgqueuer's cycle: the same number of jobs enqueued while the workers dequeue and ack them."""

    mode: str
    batch_size: int
    jobs: int
    seconds: float
    jobs_per_s: float
    double_claims: int
    unfinished: int  # jobs enqueued and not acked by the end
    left_queued: int  # rows of its queue table left for the entrypoint at the end
    cpu: Cpu


@dataclass
class Pgqueuer:
    """pgqueuer's figures on the same PostgreSQL server."""

    cycles: dict[str, PgqCycle]
    adding: Adding


@dataclass
class Result:
    """The measurements on one database."""

    database: str
    cycles: dict[str, Cycle]  # by mode
    adding: Adding
    pgqueuer: Pgqueuer | None = None
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)  # herder/pgqueuer items/s, by mode


def cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU seconds a process has used so far (Linux's /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU time of this process, the services' process and nats-server between start and `per_item`."""

    def __init__(self, services_pid: int | None, nats_pid: int | None) -> None:
        self._pids = (services_pid, nats_pid)
        self._caller = time.process_time()
        self._others = [cpu_seconds(pid) for pid in self._pids]

    def per_item(self, items: int) -> Cpu:
        def each(before: float | None, pid: int | None) -> float | None:
            after = cpu_seconds(pid)
            return None if before is None or after is None else round((after - before) / items * 1e6, 1)

        services, nats = (each(before, pid) for before, pid in zip(self._others, self._pids, strict=True))
        return Cpu(
            caller_us=round((time.process_time() - self._caller) / items * 1e6, 1),
            services_us=services,
            nats_us=nats,
        )


def ms(ordered: list[int], fraction: float) -> float:
    """A percentile of sorted nanoseconds, in milliseconds."""
    return round(percentile(ordered, fraction) / 1e6, 2) if ordered else 0.0


def contents(start: int, count: int) -> list[dict[str, Any]]:
    """The content of items (and the payload of pgqueuer's jobs) number start to start + count."""
    return [{"invoice": f"INV-{n:08d}", "amount": n % 1000} for n in range(start, start + count)]


# --- herder: the consumers ---


class Robot:
    """One consumer: a registered robot with its own token and connection, online as an agent keeps it."""

    def __init__(self, name: str, client: Client, session: str) -> None:
        self.name = name
        self.client = client
        self.session = session
        self._beating: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, nats_url: str, name: str, token: str) -> Robot:
        """Connect as the robot, start its session with the registry and its heartbeats."""
        nc = await connect(nats_url, name=f"bench-robot-{name}", credentials=Credentials(token=token))
        robot = cls(name, Client(nc, token=token, timeout=REQUEST_TIMEOUT_S), uuid.uuid4().hex[:16])
        try:
            await robot.client.request(
                RobotConnect(robot=name, session=robot.session, heartbeat_interval_s=HEARTBEAT_INTERVAL_S)
            )
        except BaseException:
            await nc.close()
            raise
        robot._beating = asyncio.ensure_future(robot._heartbeat_forever())
        return robot

    async def _heartbeat_forever(self) -> None:
        subject = subjects.heartbeat(subjects.DEFAULT_TENANT, self.name)
        while True:
            beat = Heartbeat(session=self.session, interval_s=HEARTBEAT_INTERVAL_S, sent_at=utcnow())
            with contextlib.suppress(Exception):  # a heartbeat lost now is followed by the next one
                await self.client.nc.publish(subject, codec.dump(beat))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def close(self) -> None:
        """Stop heartbeating, end the session and close the connection."""
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
        with contextlib.suppress(Exception):
            await self.client.request(RobotGoodbye(session=self.session), timeout=5.0)
        await self.client.nc.close()


async def add_items(admin: Client, queue: str, items: int, latencies: list[int] | None = None) -> list[str]:
    """Add `items` items to `queue`, ADD_BATCH per request, one request at a time; their ids."""
    ids: list[str] = []
    for start in range(0, items, ADD_BATCH):
        batch = [NewItem(content=content) for content in contents(start, min(ADD_BATCH, items - start))]
        sent = time.perf_counter_ns()
        added = await admin.request(ItemAdd(queue=queue, items=batch))
        if latencies is not None:
            latencies.append(time.perf_counter_ns() - sent)
        ids += added.ids
    return ids


async def run_cycle(
    admin: Client,
    robots: list[Robot],
    mode: str,
    queue: str,
    items: int,
    count: int,
    meter_pids: tuple[int | None, int | None],
) -> Cycle:
    """Add `items` items to a new queue while every robot takes up to `count` at a time and finishes them."""
    await admin.request(QueueCreate(name=queue))
    handed: Counter[str] = Counter()
    finished: set[str] = set()
    added: list[str] = []
    next_ns: list[int] = []
    result_ns: list[int] = []
    empty = refused = 0
    last_done = 0.0
    adding_done = asyncio.Event()
    add_span = 0.0

    async def adder() -> None:
        nonlocal add_span
        started = time.perf_counter()
        added.extend(await add_items(admin, queue, items))
        add_span = time.perf_counter() - started
        adding_done.set()

    async def consumer(robot: Robot) -> None:
        nonlocal empty, refused, last_done
        ask = ItemNext(queues=[QueueChoice(name=queue)], count=count)
        while True:
            # Only a queue found empty after the last add was answered means the work is done.
            all_added = adding_done.is_set()
            sent = time.perf_counter_ns()
            taken = (await robot.client.request(ask)).items
            if not taken:
                empty += 1
                if all_added:
                    return
                await asyncio.sleep(EMPTY_POLL_S)
                continue
            next_ns.append(time.perf_counter_ns() - sent)
            handed.update(item.id for item in taken)
            results = [ItemResult(id=item.id, lease=item.lease, state=ItemState.SUCCESSFUL) for item in taken]
            sent = time.perf_counter_ns()
            try:
                await robot.client.request(ItemResultRequest(results=results))
            except Conflict:
                refused += len(results)
                continue
            result_ns.append(time.perf_counter_ns() - sent)
            finished.update(result.id for result in results)
            last_done = time.perf_counter()

    meter = CpuMeter(*meter_pids)
    consumers = [asyncio.ensure_future(consumer(robot)) for robot in robots]
    began = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(adder(), *consumers), CYCLE_TIMEOUT_S)
    finally:
        for task in consumers:
            task.cancel()
    if not finished:
        raise RuntimeError(f"no item of queue {queue!r} was finished: every result was refused")
    seconds = last_done - began
    cpu = meter.per_item(items)
    stats = (await admin.request(QueueShow(name=queue))).stats
    next_ns.sort()
    result_ns.sort()
    return Cycle(
        mode=mode,
        count=count,
        items=items,
        seconds=round(seconds, 3),
        items_per_s=round(items / seconds, 1),
        add_seconds=round(add_span, 3),
        next_requests=len(next_ns),
        next_empty=empty,
        next_p50_ms=ms(next_ns, 0.5),
        next_p99_ms=ms(next_ns, 0.99),
        result_requests=len(result_ns),
        result_p50_ms=ms(result_ns, 0.5),
        result_p99_ms=ms(result_ns, 0.99),
        double_claims=sum(times - 1 for times in handed.values()),
        unfinished=len(set(added) - finished),
        refused_results=refused,
        successful=stats.counts.get(ItemState.SUCCESSFUL.value, 0),
        left_open=stats.counts.get(ItemState.NEW.value, 0) + stats.counts.get(ItemState.IN_PROGRESS.value, 0),
        cpu=cpu,
    )


def adding(items: int, seconds: float, latencies: list[int]) -> Adding:
    """The figures of `items` added in `seconds` by requests that took `latencies` (ns)."""
    latencies.sort()
    return Adding(
        items=items,
        requests=len(latencies),
        seconds=round(seconds, 3),
        items_per_s=round(items / seconds, 1),
        request_p50_ms=ms(latencies, 0.5),
        request_p99_ms=ms(latencies, 0.99),
    )


async def measure_adding(admin: Client, queue: str, items: int) -> Adding:
    """Add `items` items to a new queue with no consumer at work."""
    await admin.request(QueueCreate(name=queue))
    latencies: list[int] = []
    started = time.perf_counter()
    await add_items(admin, queue, items, latencies)
    return adding(items, time.perf_counter() - started, latencies)


# --- pgqueuer ---


@dataclass
class AckTally:
    """How many of pgqueuer's acks are committed, and when the last one was."""

    expected: int
    done: int = 0
    last: float = 0.0
    all_done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


@dataclass
class TalliedQueries(Queries):
    """pgqueuer's queries, noting when its status-log writes (the acks) are committed."""

    tally: AckTally | None = None

    async def log_jobs(self, job_status: list[tuple[Job, JOB_STATUS, TracebackRecord | None]]) -> None:
        await super().log_jobs(job_status)
        if self.tally is not None:
            self.tally.done += sum(1 for _, status, _ in job_status if status == "successful")
            self.tally.last = time.perf_counter()
            if self.tally.done >= self.tally.expected:
                self.tally.all_done.set()


@dataclass(frozen=True)
class PgqDatabase:
    """pgqueuer's database, and the driver it is reached through."""

    url: str
    driver: str  # asyncpg | psycopg

    async def queries(self, stack: contextlib.AsyncExitStack, tally: AckTally | None = None) -> TalliedQueries:
        """pgqueuer's queries on a new connection of its own, closed with `stack`."""
        if self.driver == "asyncpg":
            # Not one of herder's dependencies (pgqueuer's `asyncpg` extra): used when installed by hand.
            asyncpg: Any = importlib.import_module("asyncpg")
            connection = await asyncpg.connect(dsn=self.url)
            stack.push_async_callback(connection.close)
            return TalliedQueries(AsyncpgDriver(connection), tally=tally)
        # pgqueuer's psycopg driver needs autocommit.
        connection = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        await stack.enter_async_context(connection)
        return TalliedQueries(PsycopgDriver(connection), tally=tally)


async def pgq_listening(manager: QueueManager, runner: asyncio.Future[None]) -> None:
    """Until `manager` hears its own NOTIFY probe: its worker is running and listening."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while True:
        if runner.done():
            runner.result()  # its failure, said here
            raise RuntimeError("a pgqueuer QueueManager stopped before it listened")
        try:
            await manager.listener_healthy(timedelta(seconds=0.2))
            return
        except FailingListenerError:
            if time.monotonic() > deadline:
                raise


async def pgq_enqueue(queries: Queries, entrypoint: str, jobs: int, latencies: list[int] | None = None) -> list[int]:
    """Enqueue `jobs` jobs, ADD_BATCH per call, one call at a time; their ids."""
    ids: list[int] = []
    for start in range(0, jobs, ADD_BATCH):
        payloads: list[bytes | None] = [
            json.dumps(content).encode() for content in contents(start, min(ADD_BATCH, jobs - start))
        ]
        sent = time.perf_counter_ns()
        ids += await queries.enqueue([entrypoint] * len(payloads), payloads, [0] * len(payloads))
        if latencies is not None:
            latencies.append(time.perf_counter_ns() - sent)
    return ids


async def run_pgq_cycle(db: PgqDatabase, mode: str, jobs: int, consumers: int, batch_size: int) -> PgqCycle:
    """Enqueue `jobs` jobs while `consumers` QueueManagers dequeue them `batch_size` at a time and ack them."""
    tally = AckTally(expected=jobs)
    handed: Counter[int] = Counter()
    async with contextlib.AsyncExitStack() as stack:
        producer = await db.queries(stack)
        managers: list[QueueManager] = []
        runs: list[asyncio.Future[None]] = []

        async def stop_workers() -> None:
            for manager in managers:
                manager.shutdown.set()
            await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), WORKER_START_TIMEOUT_S)

        for _ in range(consumers):
            manager = QueueManager(await db.queries(stack, tally))

            @manager.entrypoint(PGQ_ENTRYPOINT)
            async def work(job: Job) -> None:
                handed[job.id] += 1

            managers.append(manager)
        # Stopped before their connections close (the stack closes them after this).
        stack.push_async_callback(stop_workers)
        runs += [asyncio.ensure_future(manager.run(batch_size=batch_size)) for manager in managers]
        for manager, run in zip(managers, runs, strict=True):
            await pgq_listening(manager, run)
        meter = CpuMeter(None, None)
        began = time.perf_counter()
        enqueued = await pgq_enqueue(producer, PGQ_ENTRYPOINT, jobs)
        await asyncio.wait_for(tally.all_done.wait(), CYCLE_TIMEOUT_S)
        seconds = tally.last - began
        cpu = meter.per_item(jobs)
        await stop_workers()
        left = sum(row.count for row in await producer.queue_size() if row.entrypoint == PGQ_ENTRYPOINT)
        await producer.clear_queue(PGQ_ENTRYPOINT)
    return PgqCycle(
        mode=mode,
        batch_size=batch_size,
        jobs=jobs,
        seconds=round(seconds, 3),
        jobs_per_s=round(jobs / seconds, 1),
        double_claims=sum(times - 1 for times in handed.values()),
        unfinished=len(set(enqueued) - set(handed)) + max(0, jobs - tally.done),
        left_queued=left,
        cpu=cpu,
    )


async def measure_pgq_adding(db: PgqDatabase, jobs: int) -> Adding:
    """Enqueue `jobs` jobs with no worker to take them, then clear them away."""
    async with contextlib.AsyncExitStack() as stack:
        queries = await db.queries(stack)
        latencies: list[int] = []
        started = time.perf_counter()
        await pgq_enqueue(queries, PGQ_ADD_ONLY_ENTRYPOINT, jobs, latencies)
        seconds = time.perf_counter() - started
        await queries.clear_queue(PGQ_ADD_ONLY_ENTRYPOINT)
    return adding(jobs, seconds, latencies)


async def install_pgqueuer(db: PgqDatabase) -> str:
    """Install pgqueuer's schema with its own API; return the server's version and commit setting."""
    async with contextlib.AsyncExitStack() as stack:
        queries = await db.queries(stack)
        await queries.install()
        rows = await queries.driver.fetch(
            "SELECT current_setting('server_version') AS version, current_setting('synchronous_commit') AS sync"
        )
    return f"PostgreSQL {rows[0]['version']} (synchronous_commit {rows[0]['sync']})"


# --- one database ---


def batch_count(mode: str, args: argparse.Namespace) -> int:
    """Items per `item_next` (and pgqueuer's batch size) in `mode`."""
    return 1 if mode == "single" else int(args.batch)


async def run_database(
    database: str, db_url: str, server: EmbeddedNats, root: Path, args: argparse.Namespace, pgq: PgqDatabase | None
) -> Result:
    services, token = await Child.start("services", SERVICES_FLAG, server.url, db_url, str(root / "services"))
    nc = await connect(server.url, name="bench-adder", credentials=Credentials(token=token))
    robots: list[Robot] = []
    try:
        admin = Client(nc, token=token, timeout=REQUEST_TIMEOUT_S)
        for index in range(args.consumers):
            name = f"bench-{index:02d}"
            added = await admin.request(RobotAdd(name=name, type=RobotType.UNATTENDED, host="bench"))
            robots.append(await Robot.connect(server.url, name, added.token))
        pids = (services.process.pid, server.pid)
        if args.warmup:
            await run_cycle(admin, robots, "batch", "bench-warmup", args.warmup, batch_count("batch", args), pids)
        cycles: dict[str, Cycle] = {}
        pgq_cycles: dict[str, PgqCycle] = {}
        ratios: dict[str, float] = {}
        # herder and pgqueuer take turns in each mode, so that a change of load on the machine
        # hits both alike.
        for mode in MODES if args.mode == "both" else (args.mode,):
            count = batch_count(mode, args)
            cycles[mode] = await run_cycle(admin, robots, mode, f"bench-{mode}", args.items, count, pids)
            if pgq is not None:
                pgq_cycles[mode] = await run_pgq_cycle(pgq, mode, args.items, args.consumers, count)
                ratios[mode] = round(cycles[mode].items_per_s / pgq_cycles[mode].jobs_per_s, 2)
        result = Result(database=database, cycles=cycles, adding=await measure_adding(admin, "bench-add", args.items))
        if pgq is not None:
            result.pgqueuer = Pgqueuer(cycles=pgq_cycles, adding=await measure_pgq_adding(pgq, args.items))
            result.ratios = ratios
        return result
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
            results.append(
                await run_database(database, f"sqlite:///{folder / 'herder.db'}", server, folder, args, None)
            )
            continue
        try:
            with postgres_database() as url, postgres_database() as pgq_url:
                pgq = PgqDatabase(pgq_url, args.pgqueuer_driver)
                env["postgres"] = await install_pgqueuer(pgq)
                env["pgqueuer_driver"] = pgq.driver
                results.append(await run_database(database, url, server, folder, args, pgq))
        except ImportError:
            raise
        except Exception as exc:
            if args.db == "postgres":
                raise
            print(f"PostgreSQL skipped: {exc}", file=sys.stderr)
    return results


# --- the report ---


def targets(results: list[Result]) -> dict[str, tuple[bool, str]]:
    """Each target's verdict and the figure it was judged on."""
    found: dict[str, tuple[bool, str]] = {}
    for result in results:
        for mode, ratio in result.ratios.items():
            found[f"herder/pgqueuer >= {TARGET_RATIO:g}, {result.database}, {mode}"] = (
                ratio >= TARGET_RATIO,
                f"{ratio:.2f}x",
            )
        if result.database == "postgres" and "batch" in result.cycles:
            rate = result.cycles["batch"].items_per_s
            found[f"{TARGET_BATCH_ITEMS_PER_S:,.0f} items/s, postgres, batch"] = (
                rate >= TARGET_BATCH_ITEMS_PER_S,
                f"{rate:,.0f} items/s",
            )
    claims = sum(cycle.double_claims for result in results for cycle in result.cycles.values())
    found[f"double claims == {TARGET_DOUBLE_CLAIMS}, every herder run"] = (claims == TARGET_DOUBLE_CLAIMS, str(claims))
    return found


def _cpu(cpu: Cpu) -> str:
    def shown(value: float | None) -> str:
        return f"{value:>7.0f}" if value is not None else f"{'-':>7}"

    return f"{shown(cpu.caller_us)} {shown(cpu.services_us)} {shown(cpu.nats_us)}"


def render(results: list[Result], args: argparse.Namespace, env: dict[str, Any]) -> str:
    load = env.get("load_average_at_start", [])
    lines = [
        f"Work queues: the full item cycle through the bus, {args.consumers} consumer robots (a connection each), "
        f"{args.items} items per mode, added {ADD_BATCH} per request; batch mode takes up to {args.batch} at once",
        f"  Python {env['python']}, nats-py {env['nats_py']}, SQLAlchemy {env['sqlalchemy']}, {env['nats_server']}, "
        f"pgqueuer {env['pgqueuer']}, {env.get('postgres', 'PostgreSQL not used')}",
        f"  {env['cpus']} CPUs, load average at start {' / '.join(f'{x:.2f}' for x in load)} (1 / 5 / 15 min), "
        f"at end {' / '.join(f'{x:.2f}' for x in env.get('load_average_at_end', []))}",
        "",
        "  herder: items added while the consumers take and finish them (first add -> last result)",
        f"  {'database':<9} {'mode':<7} {'items/s':>8} {'seconds':>8} {'adding s':>9} {'next p50':>9} "
        f"{'next p99':>9} {'result p50':>10} {'result p99':>10} {'empty':>6}",
    ]
    for result in results:
        for mode, c in result.cycles.items():
            lines.append(
                f"  {result.database:<9} {mode:<7} {c.items_per_s:>8.0f} {c.seconds:>8.2f} {c.add_seconds:>9.2f} "
                f"{c.next_p50_ms:>6.2f} ms {c.next_p99_ms:>6.2f} ms {c.result_p50_ms:>7.2f} ms "
                f"{c.result_p99_ms:>7.2f} ms {c.next_empty:>6}"
            )
    lines += [
        "",
        "  herder: every id handed out counted; queue_show at the end",
        f"  {'database':<9} {'mode':<7} {'double claims':>13} {'unfinished':>10} {'refused':>8} "
        f"{'Successful':>10} {'New+InProgress':>14}   check",
    ]
    for result in results:
        for mode, c in result.cycles.items():
            ok = c.double_claims == 0 and c.unfinished == 0 and c.successful == c.items and c.left_open == 0
            lines.append(
                f"  {result.database:<9} {mode:<7} {c.double_claims:>13} {c.unfinished:>10} {c.refused_results:>8} "
                f"{c.successful:>10} {c.left_open:>14}   {'ok' if ok else 'FAILED'}"
            )
    lines += [
        "",
        "  CPU per item (µs): this process (consumers, adder), the services' process, nats-server; and the share",
        "  of one core the services' process used over the span (it runs on one event loop)",
        f"  {'database':<9} {'mode':<7} {'caller':>7} {'service':>7} {'nats':>7} {'service busy':>13}",
    ]
    for result in results:
        for mode, c in result.cycles.items():
            busy = f"{c.cpu.services_us * c.items_per_s / 1e4:>12.0f}%" if c.cpu.services_us is not None else ""
            lines.append(f"  {result.database:<9} {mode:<7} {_cpu(c.cpu)} {busy}")
    pgq = [(result, result.pgqueuer) for result in results if result.pgqueuer is not None]
    if pgq:
        lines += [
            "",
            f"  pgqueuer on the same PostgreSQL: {args.consumers} QueueManagers (a {env.get('pgqueuer_driver')} "
            "connection each), no-op entrypoint (first enqueue -> last ack committed)",
            f"  {'database':<9} {'mode':<7} {'batch':>5} {'jobs/s':>8} {'seconds':>8} {'double claims':>13} "
            f"{'unfinished':>10} {'left':>5} {'caller CPU µs':>14} {'herder/pgq':>11}",
        ]
        for result, figures in pgq:
            for mode, p in figures.cycles.items():
                lines.append(
                    f"  {result.database:<9} {mode:<7} {p.batch_size:>5} {p.jobs_per_s:>8.0f} {p.seconds:>8.2f} "
                    f"{p.double_claims:>13} {p.unfinished:>10} {p.left_queued:>5} {p.cpu.caller_us:>14.0f} "
                    f"{result.ratios[mode]:>10.2f}x"
                )
    lines += [
        "",
        f"  adding alone: {args.items} items, {ADD_BATCH} per request, one request at a time",
        f"  {'database':<9} {'system':<9} {'items/s':>8} {'seconds':>8} {'request p50':>12} {'request p99':>12}",
    ]
    for result in results:
        rows = [("herder", result.adding)] + ([("pgqueuer", result.pgqueuer.adding)] if result.pgqueuer else [])
        for system, a in rows:
            lines.append(
                f"  {result.database:<9} {system:<9} {a.items_per_s:>8.0f} {a.seconds:>8.2f} "
                f"{a.request_p50_ms:>9.1f} ms {a.request_p99_ms:>9.1f} ms"
            )
    lines.append("")
    for name, (met, figure) in targets(results).items():
        lines.append(f"  target {name}: {'met' if met else 'NOT met'} ({figure})")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both", help="(%(default)s)")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both", help="which cycles to run (%(default)s)")
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="items per mode (%(default)s)")
    parser.add_argument("--consumers", type=int, default=DEFAULT_CONSUMERS, help="consumer robots (%(default)s)")
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="items per item_next in batch mode (%(default)s)"
    )
    parser.add_argument(
        "--pgqueuer-driver",
        choices=("psycopg", "asyncpg"),
        default="psycopg",
        help="pgqueuer's driver: psycopg (herder's own) or asyncpg, when installed (%(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="untimed items first, in batch mode (%(default)s)"
    )
    args = parser.parse_args(argv)
    for option in ("items", "consumers", "batch"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    limit = min(MAX_ITEMS_PER_NEXT, MAX_RESULTS_PER_REQUEST)
    if args.batch > limit:
        parser.error(f"--batch must be at most {limit}: herder takes and finishes at most that many per request")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def main(argv: list[str]) -> int:
    logs.configure(level="warning")
    args = parse_args(argv)
    env = environment()
    env["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    env["pgqueuer"] = metadata.version("pgqueuer")
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
            "benchmark": "queue_cycle",
            "targets": {
                "ratio": TARGET_RATIO,
                "postgres_batch_items_per_s": TARGET_BATCH_ITEMS_PER_S,
                "double_claims": TARGET_DOUBLE_CLAIMS,
            },
            "targets_met": {name: met for name, (met, _) in targets(results).items()},
            "config": {k: getattr(args, k) for k in CONFIG_KEYS} | {"add_batch": ADD_BATCH},
            "environment": env,
            "results": {result.database: asdict(result) for result in results},
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(results, args, env))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
