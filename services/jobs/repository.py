"""The jobs service's table, and every query it makes of it.

Two guards live in the schema, not only in the code: a partial unique index lets a robot hold at
most one active (Running, Stopping, Terminating) job, and every state change is a conditional
update on the state and attempt it was decided from, so two replicas can never both move a job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol.jobs import ACTIVE_STATES, JobState, OnRobotLost, Priority
from herder.protocol.packages import PackageRef
from herder.services.common.database import UtcDateTime
from herder.services.jobs.allocation import Queued, Target
from herder.services.jobs.records import JobRecord

metadata = MetaData()

_ACTIVE_SQL = "state IN ('Running', 'Stopping', 'Terminating')"

jobs = Table(
    "jobs_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("process", String(64), nullable=False),
    Column("version", String(64), nullable=False),
    Column("package", Text(), nullable=False),
    Column("target_robot", String(63)),
    Column("target_group", String(63)),
    Column("robot", String(63)),
    Column("host", String(63)),
    Column("session", String(64)),
    Column("priority", String(8), nullable=False),
    Column("rank", Integer(), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text(), nullable=False),
    Column("attempt", Integer(), nullable=False),
    Column("input", Text(), nullable=False),
    Column("output", Text()),
    Column("error", Text()),
    Column("exit_code", Integer()),
    Column("timeout_s", Float()),
    Column("kill_grace_s", Float(), nullable=False),
    Column("on_robot_lost", String(16), nullable=False),
    Column("lost_after_s", Float(), nullable=False),
    Column("lost_at", UtcDateTime()),
    Column("stop_after_s", Float()),
    Column("stop_at", UtcDateTime()),
    Column("trigger", String(63)),
    Column("parent_job", String(32)),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    Column("started_at", UtcDateTime()),
    Column("start_acked_at", UtcDateTime()),
    Column("ended_at", UtcDateTime()),
    Index("ix_jobs_jobs_queue", "tenant", "state", "rank", "created_at"),
    Index("ix_jobs_jobs_created", "tenant", "created_at"),
    Index("ix_jobs_jobs_robot", "tenant", "robot", "state"),
    Index("ix_jobs_jobs_lost", "lost_at"),
    Index("ix_jobs_jobs_trigger", "tenant", "trigger", "state"),
    Index("ix_jobs_jobs_parent", "parent_job"),
    Index("ix_jobs_jobs_stop_at", "stop_at"),
    Index(
        "ux_jobs_jobs_robot_active",
        "tenant",
        "robot",
        unique=True,
        sqlite_where=text(_ACTIVE_SQL),
        postgresql_where=text(_ACTIVE_SQL),
    ),
)

_ACTIVE = [state.value for state in ACTIVE_STATES]


def _record(row: RowMapping) -> JobRecord:
    values: dict[str, Any] = dict(row)
    values.pop("rank")
    values["package"] = PackageRef.model_validate_json(values["package"])
    values["priority"] = Priority(values["priority"])
    values["state"] = JobState(values["state"])
    values["on_robot_lost"] = OnRobotLost(values["on_robot_lost"])
    values["input"] = json.loads(values["input"])
    values["output"] = json.loads(values["output"]) if values["output"] is not None else None
    return JobRecord(**values)


def _row(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant": record.tenant,
        "process": record.process,
        "version": record.version,
        "package": record.package.model_dump_json(),
        "target_robot": record.target_robot,
        "target_group": record.target_group,
        "robot": record.robot,
        "host": record.host,
        "session": record.session,
        "priority": record.priority.value,
        "rank": record.priority.rank,
        "state": record.state.value,
        "reason": record.reason,
        "attempt": record.attempt,
        "input": json.dumps(record.input),
        "output": json.dumps(record.output) if record.output is not None else None,
        "error": record.error,
        "exit_code": record.exit_code,
        "timeout_s": record.timeout_s,
        "kill_grace_s": record.kill_grace_s,
        "on_robot_lost": record.on_robot_lost.value,
        "lost_after_s": record.lost_after_s,
        "lost_at": record.lost_at,
        "stop_after_s": record.stop_after_s,
        "stop_at": record.stop_at,
        "trigger": record.trigger,
        "parent_job": record.parent_job,
        "created_at": record.created_at,
        "created_by": record.created_by,
        "started_at": record.started_at,
        "start_acked_at": record.start_acked_at,
        "ended_at": record.ended_at,
    }


# The statements of the busiest paths (starting, reporting, allocating) are built once: building
# one and its cache key anew costs more than SQLite takes to run it.
_INSERT = insert(jobs)
_GET = select(jobs).where(jobs.c.tenant == bindparam("tenant"), jobs.c.id == bindparam("job_id"))
_BUSY = select(jobs.c.robot, jobs.c.id).where(jobs.c.tenant == bindparam("tenant"), jobs.c.state.in_(_ACTIVE))
_NEXT = (
    select(jobs)
    .where(
        jobs.c.tenant == bindparam("tenant"),
        jobs.c.state == JobState.PENDING.value,
        or_(jobs.c.target_robot == bindparam("robot"), jobs.c.target_group.in_(bindparam("groups", expanding=True))),
    )
    .order_by(jobs.c.rank, jobs.c.created_at, jobs.c.id)
    .limit(1)
    .with_for_update(skip_locked=True)
)
# The SET clause comes from the values given; the WHERE clause holds the job as it was decided from.
_MOVE = update(jobs).where(
    jobs.c.id == bindparam("was_id"),
    jobs.c.state == bindparam("was_state"),
    jobs.c.attempt == bindparam("was_attempt"),
)
_UNCHANGING = frozenset({"id", "tenant", "created_at"})


class JobRepository:
    """Reads and writes `jobs_jobs` on a connection the caller holds."""

    async def insert(self, connection: AsyncConnection, record: JobRecord) -> None:
        """Store a new job."""
        await connection.execute(_INSERT, _row(record))

    async def insert_many(self, connection: AsyncConnection, records: Sequence[JobRecord]) -> None:
        """Store new jobs, in one statement."""
        if records:
            await connection.execute(_INSERT, [_row(record) for record in records])

    async def get(self, connection: AsyncConnection, tenant: str, job_id: str) -> JobRecord | None:
        """The job with this id."""
        row = (await connection.execute(_GET, {"tenant": tenant, "job_id": job_id})).mappings().first()
        return _record(row) if row else None

    async def by_prefix(self, connection: AsyncConnection, tenant: str, prefix: str) -> list[JobRecord]:
        """Jobs whose id starts with `prefix` (at most two: enough to tell an ambiguous prefix)."""
        if len(prefix) == 32:
            found = await self.get(connection, tenant, prefix)
            return [found] if found else []
        query = select(jobs).where(jobs.c.tenant == tenant, jobs.c.id.like(f"{prefix}%")).limit(2)
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def listing(
        self,
        connection: AsyncConnection,
        tenant: str,
        *,
        states: Sequence[JobState] = (),
        process: str | None = None,
        robot: str | None = None,
        group: str | None = None,
        trigger: str | None = None,
        parent_job: str | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """The tenant's jobs, newest first: of a robot, those it ran and those aimed at it by name; of a
        group, those aimed at it."""
        query = select(jobs).where(jobs.c.tenant == tenant)
        if states:
            query = query.where(jobs.c.state.in_([state.value for state in states]))
        if process:
            query = query.where(jobs.c.process == process)
        if robot:
            query = query.where(or_(jobs.c.robot == robot, jobs.c.target_robot == robot))
        if group:
            query = query.where(jobs.c.target_group == group)
        if trigger:
            query = query.where(jobs.c.trigger == trigger)
        if parent_job:
            query = query.where(jobs.c.parent_job == parent_job)
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def queue(self, connection: AsyncConnection, tenant: str) -> list[Queued]:
        """The tenant's Pending jobs, in the order robots take them."""
        query = (
            select(jobs.c.id, jobs.c.target_robot, jobs.c.target_group, jobs.c.rank, jobs.c.created_at)
            .where(jobs.c.tenant == tenant, jobs.c.state == JobState.PENDING.value)
            .order_by(jobs.c.rank, jobs.c.created_at, jobs.c.id)
        )
        return [
            Queued(
                id=row.id,
                target=Target(robot=row.target_robot, group=row.target_group),
                rank=row.rank,
                created_at=row.created_at,
            )
            for row in await connection.execute(query)
        ]

    async def earlier(self, connection: AsyncConnection, job: Queued, tenant: str) -> dict[Target, int]:
        """How many Pending jobs come before `job`, by target."""
        query = (
            select(jobs.c.target_robot, jobs.c.target_group, func.count())
            .where(
                jobs.c.tenant == tenant,
                jobs.c.state == JobState.PENDING.value,
                or_(
                    jobs.c.rank < job.rank,
                    and_(jobs.c.rank == job.rank, jobs.c.created_at < job.created_at),
                    and_(jobs.c.rank == job.rank, jobs.c.created_at == job.created_at, jobs.c.id < job.id),
                ),
            )
            .group_by(jobs.c.target_robot, jobs.c.target_group)
        )
        return {Target(robot=row[0], group=row[1]): int(row[2]) for row in await connection.execute(query)}

    async def open_of_trigger(self, connection: AsyncConnection, tenant: str, trigger: str) -> int:
        """How many jobs of `trigger` are Pending or active. On PostgreSQL the trigger is locked for the
        rest of the transaction first, so that two starts of one trigger cannot both count below its
        limit (SQLite runs one writing transaction at a time anyway)."""
        if connection.dialect.name == "postgresql":
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"jobs.trigger:{tenant}:{trigger}"}
            )
        query = select(func.count()).where(
            jobs.c.tenant == tenant,
            jobs.c.trigger == trigger,
            jobs.c.state.in_([JobState.PENDING.value, *_ACTIVE]),
        )
        return int((await connection.execute(query)).scalar_one())

    async def pending_by_robot(self, connection: AsyncConnection, tenant: str) -> dict[str, int]:
        """robot -> how many Pending jobs are aimed at it by name."""
        query = (
            select(jobs.c.target_robot, func.count())
            .where(jobs.c.tenant == tenant, jobs.c.state == JobState.PENDING.value, jobs.c.target_robot.is_not(None))
            .group_by(jobs.c.target_robot)
        )
        return {row[0]: int(row[1]) for row in await connection.execute(query)}

    async def overrunning(self, connection: AsyncConnection, now: datetime) -> list[JobRecord]:
        """Running jobs past the moment their stop-after duration ends: to be soft-stopped."""
        query = select(jobs).where(jobs.c.state == JobState.RUNNING.value, jobs.c.stop_at <= now)
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def busy(self, connection: AsyncConnection, tenant: str) -> dict[str, str]:
        """robot -> the job it holds, for the tenant's robots that hold one."""
        return {row.robot: row.id for row in await connection.execute(_BUSY, {"tenant": tenant})}

    async def next_for(
        self, connection: AsyncConnection, tenant: str, robot: str, groups: Sequence[str]
    ) -> JobRecord | None:
        """The Pending job `robot` should take next, locked against other replicas (PostgreSQL
        skips rows another transaction holds rather than waiting for them)."""
        params = {"tenant": tenant, "robot": robot, "groups": list(groups)}
        row = (await connection.execute(_NEXT, params)).mappings().first()
        return _record(row) if row else None

    async def active_on(self, connection: AsyncConnection, tenant: str, robot: str) -> list[JobRecord]:
        """The active jobs of a robot (one, unless something went wrong)."""
        query = select(jobs).where(jobs.c.tenant == tenant, jobs.c.robot == robot, jobs.c.state.in_(_ACTIVE))
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def pending_for_robot(self, connection: AsyncConnection, tenant: str, robot: str) -> list[JobRecord]:
        """Pending jobs aimed at `robot` by name."""
        query = select(jobs).where(
            jobs.c.tenant == tenant, jobs.c.target_robot == robot, jobs.c.state == JobState.PENDING.value
        )
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def pending_targets(self, connection: AsyncConnection) -> set[tuple[str, Target]]:
        """(tenant, target) of every Pending job, once each."""
        query = select(jobs.c.tenant, jobs.c.target_robot, jobs.c.target_group).where(
            jobs.c.state == JobState.PENDING.value
        )
        rows = await connection.execute(query.distinct())
        return {(row.tenant, Target(robot=row.target_robot, group=row.target_group)) for row in rows}

    async def all_active(self, connection: AsyncConnection) -> list[JobRecord]:
        """Every active job of every tenant."""
        query = select(jobs).where(jobs.c.state.in_(_ACTIVE))
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def move(self, connection: AsyncConnection, before: JobRecord, after: JobRecord) -> bool:
        """Write `after` if the job is still as `before` found it (same state and attempt); False if
        someone moved it first."""
        values = {key: value for key, value in _row(after).items() if key not in _UNCHANGING}
        values.update(was_id=before.id, was_state=before.state.value, was_attempt=before.attempt)
        result = await connection.execute(_MOVE, values)
        return result.rowcount == 1

    async def take(self, connection: AsyncConnection, before: JobRecord, after: JobRecord) -> bool:
        """`move`, for giving a job to a robot: False (and the rest of the transaction intact) when the
        robot holds an active job already, whichever replica gave it that one.

        The schema's one-active-job-per-robot index refuses the move; the failed statement is undone
        alone (PostgreSQL, whose failed statements spoil the whole transaction, through a savepoint;
        SQLite undoes just the statement)."""
        try:
            if connection.dialect.name == "postgresql":
                async with connection.begin_nested():
                    return await self.move(connection, before, after)
            return await self.move(connection, before, after)
        except IntegrityError:
            return False

    async def held(self, connection: AsyncConnection) -> list[JobRecord]:
        """Running jobs waiting for their robot to come back (they carry the time contact was lost)."""
        query = select(jobs).where(jobs.c.state == JobState.RUNNING.value, jobs.c.lost_at.is_not(None))
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def acknowledge_starts(self, connection: AsyncConnection, acks: Sequence[tuple[str, int, datetime]]) -> None:
        """Record that robots confirmed they got these starts: (job id, attempt, when)."""
        if not acks:
            return
        await connection.execute(
            update(jobs)
            .where(
                jobs.c.id == bindparam("job_id"),
                jobs.c.attempt == bindparam("job_attempt"),
                jobs.c.start_acked_at.is_(None),
            )
            .values(start_acked_at=bindparam("acked_at")),
            [{"job_id": job_id, "job_attempt": attempt, "acked_at": at} for job_id, attempt, at in acks],
        )

    async def unacknowledged(self, connection: AsyncConnection, started_before: datetime) -> list[JobRecord]:
        """Running jobs whose robot has not confirmed the start it was sent before `started_before`."""
        query = select(jobs).where(
            jobs.c.state == JobState.RUNNING.value,
            jobs.c.start_acked_at.is_(None),
            jobs.c.started_at <= started_before,
        )
        return [_record(row) for row in (await connection.execute(query)).mappings()]
