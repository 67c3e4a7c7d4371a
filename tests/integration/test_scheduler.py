"""Triggers against the real services: a real nats-server, SQLite and PostgreSQL, the jobs service
creating the jobs, and a second scheduler replica run as its own process and killed mid-minute."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from herder.client import discovery
from herder.protocol.errors import BadRequest, Conflict, Forbidden, NotFound
from herder.protocol.jobs import JobInfo, JobListRequest, JobStart, JobState
from herder.protocol.queues import ItemAdd, NewItem, QueueCreate
from herder.protocol.scheduler import (
    QueueRule,
    Schedule,
    TriggerAdd,
    TriggerDisable,
    TriggerEnable,
    TriggerFireNow,
    TriggerJob,
    TriggerListRequest,
    TriggerRemove,
    TriggerShow,
)
from herder.protocol.secrets import AssetSet, AssetType
from herder.services.common.credentials import ServiceCredential
from herder.services.scheduler.repository import fires as fires_table
from tests.fleet import Fleet, python_process, running_fleet
from tests.support import eventually

HERDER = str(Path(sys.executable).with_name("herder"))
EVERY_SECOND = "* * * * * *"
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
async def fleet(nats_url: str, db_url: str, tmp_path: Path, credential: ServiceCredential) -> AsyncIterator[Fleet]:
    async with running_fleet(nats_url, db_url, tmp_path, credential) as started:
        await started.publish(python_process(tmp_path, "nightly", "def main():\n    return {}\n"))
        await started.add_robot("r1", groups=["pool"])
        await started.add_robot("r2", groups=["pool"])
        yield started


def every_second(name: str, **job: object) -> TriggerAdd:
    return TriggerAdd(
        name=name, job=TriggerJob(process="nightly", robot="r1", **job), schedule=Schedule(cron=EVERY_SECOND)
    )


async def jobs_of(fleet: Fleet, trigger: str) -> list[JobInfo]:
    return (await fleet.client.request(JobListRequest(trigger=trigger, limit=1000))).jobs


async def test_bad_triggers_are_refused_naming_the_field(fleet: Fleet) -> None:
    job = TriggerJob(process="nightly", robot="r1")
    cases: list[tuple[Schedule | None, QueueRule | None, TriggerJob, type[Exception], str]] = [
        (Schedule(cron="61 * * * *"), None, job, BadRequest, "schedule.cron"),
        (Schedule(cron="* * *"), None, job, BadRequest, "3 fields"),
        (Schedule(cron="0 6 * * *", tz="Mars/Olympus"), None, job, BadRequest, "schedule.tz"),
        (Schedule(cron="0 6 30 2 *"), None, job, BadRequest, "schedule.cron"),
        (
            Schedule(cron="0 6 * * *", valid_until=datetime(2020, 1, 1, tzinfo=UTC)),
            None,
            job,
            BadRequest,
            "never fires",
        ),
        (Schedule(cron="0 6 * * *", calendar="holidays"), None, job, NotFound, "calendar asset 'holidays'"),
        (Schedule(cron="0 6 * * *"), None, TriggerJob(process="nope", robot="r1"), NotFound, "nope"),
        (Schedule(cron="0 6 * * *"), None, TriggerJob(process="nightly", robot="ghost"), NotFound, "ghost"),
        (Schedule(cron="0 6 * * *"), None, TriggerJob(process="nightly", group="nobody"), NotFound, "nobody"),
        (None, QueueRule(queue="missing"), job, NotFound, "missing"),
    ]
    for schedule, queue, spec, error, words in cases:
        with pytest.raises(error) as refused:
            await fleet.client.request(TriggerAdd(name="bad", job=spec, schedule=schedule, queue=queue))
        assert words in str(refused.value), (schedule, queue, refused.value)
    await fleet.client.request(AssetSet(name="launch", type=AssetType.TEXT, value="go"))
    with pytest.raises(BadRequest, match="is a text, not a calendar"):
        await fleet.client.request(
            TriggerAdd(name="bad", job=job, schedule=Schedule(cron="0 6 * * *", calendar="launch"))
        )
    assert (await fleet.client.request(TriggerListRequest())).triggers == []
    # Only the scheduler names a job's trigger.
    with pytest.raises(Forbidden, match="only the scheduler"):
        await fleet.client.request(JobStart(process="nightly", robot="r1", trigger="forged"))


async def test_a_cron_trigger_makes_one_job_per_fire_and_shows_its_history(fleet: Fleet) -> None:
    added = await fleet.client.request(every_second("often"))
    assert added.enabled and len(added.next_fires) == 1
    with pytest.raises(Conflict, match="exists"):
        await fleet.client.request(every_second("often"))

    await eventually(lambda: _at_least(fleet, "often", 3), timeout=15)
    details = await fleet.client.request(TriggerShow(name="often"))
    assert len(details.trigger.next_fires) == 5
    times = details.trigger.next_fires
    assert all(later - earlier == timedelta(seconds=1) for earlier, later in itertools.pairwise(times))
    made = [fire for fire in details.fires if fire.job_id]
    assert made and all(fire.scheduled_at is not None and fire.fired_at is not None for fire in made)
    jobs = await jobs_of(fleet, "often")
    assert {job.trigger for job in jobs} == {"often"} and all(job.created_by == "scheduler" for job in jobs)
    assert {fire.job_id for fire in made} <= {job.id for job in jobs}

    disabled = await fleet.client.request(TriggerDisable(name="often"))
    assert not disabled.enabled and disabled.next_fires == []
    await asyncio.sleep(1.5)  # a fire in flight at the moment of disabling may still land
    count = len(await jobs_of(fleet, "often"))
    await asyncio.sleep(2.0)
    assert len(await jobs_of(fleet, "often")) == count

    enabled = await fleet.client.request(TriggerEnable(name="often"))
    assert enabled.enabled
    await eventually(lambda: _at_least(fleet, "often", count + 1), timeout=10)

    async def counted() -> bool:
        # A run is counted once the fire's job exists, with the fire's outcome, a moment after it.
        listing = await fleet.client.request(TriggerListRequest())
        assert [trigger.name for trigger in listing.triggers] == ["often"]
        return listing.triggers[0].runs >= count + 1 and listing.triggers[0].last_fire is not None

    await eventually(counted, timeout=5)

    removed = await fleet.client.request(TriggerRemove(name="often"))
    assert removed.name == "often"
    with pytest.raises(NotFound):
        await fleet.client.request(TriggerShow(name="often"))


async def _at_least(fleet: Fleet, trigger: str, count: int) -> bool:
    return len(await jobs_of(fleet, trigger)) >= count


async def test_max_concurrent_skips_fires_while_the_trigger_has_open_jobs(fleet: Fleet) -> None:
    # r1 is registered but not running: the trigger's first job waits as Pending, and holds its place.
    await fleet.client.request(every_second("single", max_concurrent=1))

    async def skipped() -> str | None:
        details = await fleet.client.request(TriggerShow(name="single"))
        return next((fire.skipped for fire in details.fires if fire.skipped), None)

    reason = await eventually(skipped, timeout=15)
    assert "has 1 jobs Pending or running" in reason
    jobs = await jobs_of(fleet, "single")
    assert len(jobs) == 1 and jobs[0].state is JobState.PENDING


async def test_when_busy_skip_and_max_runs(fleet: Fleet) -> None:
    await fleet.client.request(
        TriggerAdd(
            name="idle-only",
            job=TriggerJob(process="nightly", group="pool", when_busy="skip"),
            schedule=Schedule(cron=EVERY_SECOND),
        )
    )
    await fleet.client.request(
        TriggerAdd(
            name="thrice",
            job=TriggerJob(process="nightly", robot="r2"),
            schedule=Schedule(cron=EVERY_SECOND, max_runs=3),
        )
    )

    async def idle_skip() -> str | None:
        details = await fleet.client.request(TriggerShow(name="idle-only"))
        return next((fire.skipped for fire in details.fires if fire.skipped), None)

    assert "every robot of group pool is busy or offline" in await eventually(idle_skip, timeout=15)
    assert await jobs_of(fleet, "idle-only") == []
    await eventually(lambda: _at_least(fleet, "thrice", 3), timeout=15)
    await asyncio.sleep(2.0)
    assert len(await jobs_of(fleet, "thrice")) == 3
    shown = await fleet.client.request(TriggerShow(name="thrice"))
    assert shown.trigger.runs == 3 and shown.trigger.next_fires == []


async def test_fire_now_is_idempotent_and_a_calendar_moves_fires(fleet: Fleet) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date()
    await fleet.client.request(AssetSet(name="holidays", type=AssetType.CALENDAR, value=[tomorrow.isoformat()]))
    await fleet.client.request(
        TriggerAdd(
            name="daily",
            job=TriggerJob(process="nightly", robot="r1"),
            schedule=Schedule(cron="30 6 * * *", calendar="holidays", on_off_day="skip"),
        )
    )
    shown = await fleet.client.request(TriggerShow(name="daily"))
    assert tomorrow not in {moment.date() for moment in shown.trigger.next_fires}

    first = await fleet.client.request(TriggerFireNow(name="daily"), idempotency_key="by-hand-1")
    again = await fleet.client.request(TriggerFireNow(name="daily"), idempotency_key="by-hand-1")
    assert first.job_id is not None and again.job_id == first.job_id and first.cause == "by hand"
    assert [job.id for job in await jobs_of(fleet, "daily")] == [first.job_id]


async def test_a_queue_trigger_starts_jobs_while_items_wait(fleet: Fleet) -> None:
    await fleet.client.request(QueueCreate(name="invoices"))
    await fleet.client.request(
        TriggerAdd(
            name="on-invoices",
            job=TriggerJob(process="nightly", group="pool"),
            queue=QueueRule(queue="invoices", min_items=2, max_jobs=2),
        )
    )
    await fleet.client.request(ItemAdd(queue="invoices", items=[NewItem(content={"n": 1})]))
    await asyncio.sleep(1.0)
    assert await jobs_of(fleet, "on-invoices") == []  # one item is below min_items
    await fleet.client.request(ItemAdd(queue="invoices", items=[NewItem(content={"n": n}) for n in range(2, 8)]))
    await eventually(lambda: _at_least(fleet, "on-invoices", 2), timeout=10)
    await asyncio.sleep(1.0)
    assert len(await jobs_of(fleet, "on-invoices")) == 2  # at most max_jobs open at once


@pytest.mark.timeout(240)
async def test_two_replicas_one_killed_mid_minute_make_exactly_one_job_per_fire(
    fleet: Fleet, nats_url: str, db_url: str, credential: ServiceCredential, tmp_path: Path
) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("a SQLite database serves one process; scheduler replicas share PostgreSQL")
    credential_file = tmp_path / "credential.json"
    credential.write(credential_file)
    log = (tmp_path / "replica.log").open("wb")
    replica = subprocess.Popen(  # noqa: ASYNC220 - started once and killed, never waited on here
        [
            HERDER,
            "service",
            "run",
            "scheduler",
            "--nats",
            nats_url,
            "--db",
            db_url,
            "--credential",
            str(credential_file),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "HERDER_LOG_FORMAT": "json"},
    )
    try:
        await eventually(lambda: _replicas(fleet, 2), timeout=30, interval=0.2)
        started = datetime.now(UTC)
        for n in range(3):
            await fleet.client.request(every_second(f"tick{n}"))
        await asyncio.sleep(6.5)
        replica.send_signal(signal.SIGKILL)  # mid-minute, mid-fire as likely as not
        replica.wait(timeout=10)
        await asyncio.sleep(8.0)
        ended = datetime.now(UTC)
    finally:
        if replica.poll() is None:
            replica.kill()
            replica.wait()
        log.close()
    for n in range(3):
        await fleet.client.request(TriggerDisable(name=f"tick{n}"))
    await asyncio.sleep(TAKE_OVER_WAIT_S)  # fires the dead replica left are taken over
    for n in range(3):
        details = await fleet.client.request(TriggerShow(name=f"tick{n}"))
        jobs = await jobs_of(fleet, f"tick{n}")
        assert len({job.id for job in jobs}) == len(jobs)
        # Every second from a moment after the trigger was added to a moment before the end has
        # exactly one fire, and each fire made one job of its own.
        window = [started + timedelta(seconds=s) for s in range(3, int((ended - started).total_seconds()) - 1)]
        fires = await _all_fires(fleet, f"tick{n}")
        by_second = {fire.replace(microsecond=0) for fire in fires}
        missing = [moment.replace(microsecond=0) for moment in window if moment.replace(microsecond=0) not in by_second]
        assert not missing, (n, missing)
        assert len(jobs) >= len(window) and details.trigger.runs == len(jobs)


TAKE_OVER_WAIT_S = 7.0


async def _replicas(fleet: Fleet, count: int) -> bool:
    found = discovery.summarize(await discovery.gather(fleet.nc, timeout=1.0))
    return any(service.name == "scheduler" and service.instances >= count for service in found)


async def _all_fires(fleet: Fleet, trigger: str) -> list[datetime]:
    """The scheduled times of a trigger's fires that made a job, from the jobs' own records."""

    engine = fleet.host.engine
    assert engine is not None
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(fires_table.c.scheduled_at).where(
                fires_table.c.trigger_name == trigger, fires_table.c.job_id.is_not(None)
            )
        )
        return [row[0] for row in rows]
