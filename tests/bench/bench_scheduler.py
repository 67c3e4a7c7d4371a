"""Triggers: how late a fire's job is created, and whether every fire makes exactly one job.

Run it with `make bench` or `.venv/bin/python tests/bench/bench_scheduler.py [--db sqlite|postgres|both] [--json]`.

One isolated nats-server is started (herder's `EmbeddedNats`, temporary store) and, for each load
and database, a fresh stack: a child process (the one `bench_dispatch.py` starts, every service of
`herder up`; HERDER_BENCH_PROFILE=FILE profiles it) runs herder's services (auth, registry, packages,
jobs, scheduler and the rest) in one `ServiceHost`, on a fresh SQLite file or a fresh PostgreSQL
database (from HERDER_TEST_POSTGRES); on PostgreSQL a second scheduler replica runs in a process of
its own (`herder service run scheduler`), as a deployment without a single scheduler node would.
This process is the caller, with herder's `Client` and an admin token, through the fence.

Two loads, each of cron triggers with a seconds field, aimed at ROBOTS registered robots (of one
group) that do not run, so every job stays Pending and the measure is the scheduler's and the jobs
service's alone:

1. spread: TRIGGERS triggers, trigger i firing at second i % 60 of every minute (about
   TRIGGERS / 60 fires a second);
2. burst: BURST triggers all firing at the same second of every minute.

The triggers are added through `trigger_add`; then the benchmark waits for the next whole minute
(or, with `--seconds N` under 60, a window of N seconds from just after) and measures the fires
scheduled in it: for each, the lateness from its scheduled time to its
job's creation (the jobs service's `created_at`), p50, p99 and max; misses (triggers with no fire
in the window of a trigger due in it); duplicates (jobs of the triggers beyond one per fire, over the whole run).

Targets: 0 duplicates, 0 misses; p99 lateness under 100 ms for the spread load and under 1 s for
the burst. The script reports whether they are met and exits 0 either way on a completed run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench_dispatch import SERVICES_FLAG, Child, credential_file, postgres_database
from benchlib import environment, percentile
from sqlalchemy import func, select

from herder.cli.packages import publish_folder
from herder.client import logs
from herder.client.connection import Credentials, connect
from herder.client.requests import Client
from herder.protocol.registry import RobotAdd, RobotType
from herder.protocol.scheduler import Schedule, TriggerAdd, TriggerJob
from herder.services.common import database
from herder.services.common.credentials import ServiceCredential
from herder.services.common.natsserver import EmbeddedNats

HERDER = str(Path(sys.executable).with_name("herder"))
ADD_CONCURRENCY = 32
# Fires of the measured minute are read this long after it ends: the late ones land meanwhile.
SETTLE_S = 5.0


@dataclass
class Load:
    """What one run measured."""

    database: str
    load: str
    triggers: int
    replicas: int
    add_s: float
    fires: int
    misses: int
    duplicates: int
    skipped: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    target_p99_ms: float

    @property
    def met(self) -> bool:
        return (
            self.misses == 0 and self.duplicates == 0 and self.p99_ms is not None and self.p99_ms < self.target_p99_ms
        )


def second_of(load: str, n: int, burst_second: int) -> int:
    """The second of each minute trigger `n` of a load fires at."""
    return n % 60 if load == "spread" else burst_second


async def run_load(
    nats_url: str, db_url: str, root: Path, load: str, count: int, robots: int, database_name: str, seconds: int
) -> Load:
    folder = root / f"{database_name}-{load}"
    folder.mkdir()
    ServiceCredential.read(credential_file(root)).write(credential_file(folder))
    services, token = await Child.start("services", SERVICES_FLAG, nats_url, db_url, str(folder / "services"))
    replicas: list[subprocess.Popen[bytes]] = []
    try:
        if database_name == "postgres":
            replica_command = [HERDER, "service", "run", "scheduler", "--nats", nats_url, "--db", db_url]
            replicas.append(
                subprocess.Popen(  # noqa: ASYNC220 - started once, stopped at the end
                    [*replica_command, "--credential", str(credential_file(folder)), "--log-level", "warning"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        nc = await connect(nats_url, name="bench-caller", credentials=Credentials(token=token))
        try:
            client = Client(nc, token=token, timeout=30.0)
            process = folder / "process"
            process.mkdir()
            (process / "herder.toml").write_text('name = "tick"\nversion = "1.0.0"\n\n[entry]\npython = "main:main"\n')
            (process / "main.py").write_text("def main():\n    return {}\n")
            await publish_folder(nc, client, process)
            for n in range(robots):
                await client.request(RobotAdd(name=f"bot{n}", type=RobotType.UNATTENDED, host="box", groups=["pool"]))
            began = time.perf_counter()
            # The burst second: far enough ahead that all the triggers are in by then.
            burst_at = (datetime.now(UTC) + timedelta(seconds=45 if seconds >= 60 else 10 + count // 20)).replace(
                microsecond=0
            )
            burst_second = burst_at.second
            semaphore = asyncio.Semaphore(ADD_CONCURRENCY)

            async def add(n: int) -> None:
                async with semaphore:
                    await client.request(
                        TriggerAdd(
                            name=f"t{n}",
                            job=TriggerJob(process="tick", group="pool"),
                            schedule=Schedule(cron=f"{second_of(load, n, burst_second)} * * * * *"),
                        )
                    )

            await asyncio.gather(*(add(n) for n in range(count)))
            add_s = time.perf_counter() - began
            now = datetime.now(UTC)
            if seconds >= 60:  # the next whole minute
                start = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
            elif load == "burst":  # a short run: around the burst
                start = burst_at - timedelta(seconds=2)
            else:  # a short run: from the next whole second but one
                start = now.replace(microsecond=0) + timedelta(seconds=2)
            end = start + timedelta(seconds=seconds)
            in_window = {(start + timedelta(seconds=k)).second for k in range(min(seconds, 60))}
            expected = {f"t{n}" for n in range(count) if second_of(load, n, burst_second) in in_window}
            await asyncio.sleep((end - datetime.now(UTC)).total_seconds() + SETTLE_S)
        finally:
            await nc.close()
    finally:
        for replica in replicas:
            replica.terminate()
        await services.stop()
        for replica in replicas:
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.wait(timeout=30)
    # Read once the services have stopped: a SQLite database belongs to one process while it runs.
    return await tally(db_url, database_name, load, count, expected, len(replicas) + 1, add_s, start, end)


async def tally(
    db_url: str,
    database_name: str,
    load: str,
    count: int,
    expected: set[str],
    replicas: int,
    add_s: float,
    start: datetime,
    end: datetime,
) -> Load:
    """Read the fires of [start, end) and their jobs from the database the services wrote."""
    from herder.services.jobs.repository import jobs
    from herder.services.scheduler.repository import fires

    engine = database.create_engine(db_url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(fires.c.trigger_name, fires.c.scheduled_at, fires.c.skipped, jobs.c.created_at)
                    .select_from(fires.outerjoin(jobs, jobs.c.id == fires.c.job_id))
                    .where(fires.c.scheduled_at >= start, fires.c.scheduled_at < end)
                )
            ).all()
            made = (await connection.execute(select(func.count()).where(fires.c.job_id.is_not(None)))).scalar_one()
            made_jobs = (await connection.execute(select(func.count()).where(jobs.c.trigger.is_not(None)))).scalar_one()
    finally:
        await engine.dispose()
    fired = {row.trigger_name for row in rows}
    lateness = sorted(
        (row.created_at - row.scheduled_at).total_seconds() * 1000 for row in rows if row.created_at is not None
    )
    return Load(
        database=database_name,
        load=load,
        triggers=count,
        replicas=replicas,
        add_s=round(add_s, 1),
        fires=len(rows),
        misses=len(expected - fired),
        duplicates=max(int(made_jobs) - int(made), 0) + (len(rows) - len(fired)),
        skipped=sum(1 for row in rows if row.skipped),
        p50_ms=round(percentile(lateness, 0.50), 1) if lateness else None,
        p99_ms=round(percentile(lateness, 0.99), 1) if lateness else None,
        max_ms=round(lateness[-1], 1) if lateness else None,
        target_p99_ms=100.0 if load == "spread" else 1000.0,
    )


async def measure(args: argparse.Namespace, server: EmbeddedNats, root: Path) -> list[Load]:
    results: list[Load] = []
    for database_name in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        for load, count in (("spread", args.triggers), ("burst", args.burst)):
            if not count:
                continue
            if database_name == "sqlite":
                url = f"sqlite:///{root / f'{load}.db'}"
                results.append(
                    await run_load(server.url, url, root, load, count, args.robots, database_name, args.seconds)
                )
            else:
                with postgres_database() as url:
                    results.append(
                        await run_load(server.url, url, root, load, count, args.robots, database_name, args.seconds)
                    )
            print(render_line(results[-1]), file=sys.stderr, flush=True)
    return results


def render_line(r: Load) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    verdict = "met" if r.met else "NOT met"
    return (
        f"{r.database:<9} {r.load:<7} {r.triggers:>6,} triggers  {r.replicas} scheduler(s)  fires {r.fires:>6,}  "
        f"misses {r.misses}  duplicates {r.duplicates}  skipped {r.skipped}  lateness p50 {ms(r.p50_ms)} ms  "
        f"p99 {ms(r.p99_ms)} ms  max {ms(r.max_ms)} ms  (target p99 < {r.target_p99_ms:,.0f} ms: {verdict}; "
        f"triggers added in {r.add_s} s)"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--triggers", type=int, default=10_000, help="triggers of the spread load")
    parser.add_argument("--burst", type=int, default=1_000, help="triggers of the burst load")
    parser.add_argument("--robots", type=int, default=10)
    parser.add_argument(
        "--seconds", type=int, default=60, help="how long a window is measured (60: the next whole minute)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    logs.configure(level="warning")
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
    if args.json:
        print(json.dumps({"environment": environment(), "results": [asdict(r) for r in results]}, indent=2))
    else:
        print("herder scheduler benchmark")
        for result in results:
            print(render_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
