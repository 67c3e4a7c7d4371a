"""The scheduler's tables, and every query it makes of them.

Exactly one job per fire rests on the schema: a scheduled fire is a row keyed by its trigger and
scheduled time, and the replica whose insert of that row succeeds owns the fire (the others' inserts
do nothing). The owner starts the job under the fire's key, so a replica that takes over a fire its
owner left unfinished (it died mid-fire) starts the same job, never a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from herder.protocol.scheduler import FireInfo, MailRule, QueueRule, Schedule, TriggerJob, TriggerKind
from herder.services.common.database import UtcDateTime
from herder.services.scheduler.triggers import TriggerRecord

metadata = MetaData()

_UNFINISHED_SQL = "job_id IS NULL AND skipped IS NULL"

triggers = Table(
    "scheduler_triggers",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("name", String(63), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("enabled", Boolean(), nullable=False),
    Column("job", Text(), nullable=False),
    Column("schedule", Text()),
    Column("queue_rule", Text()),
    Column("mail_rule", Text()),
    # The queue a queue trigger watches and the calendar a cron trigger reads, to find the triggers
    # an event concerns.
    Column("queue_name", String(128)),
    Column("calendar", String(128)),
    Column("runs", Integer(), nullable=False),
    Column("month", String(7)),
    Column("month_runs", Integer(), nullable=False),
    Column("considered_until", UtcDateTime()),
    Column("last_fire", Text()),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(128)),
    Column("updated_at", UtcDateTime()),
    UniqueConstraint("tenant", "name", name="ux_scheduler_triggers_name"),
    Index("ix_scheduler_triggers_queue", "tenant", "queue_name"),
)

fires = Table(
    "scheduler_fires",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("trigger_id", String(32), nullable=False),
    Column("trigger_name", String(63), nullable=False),
    Column("scheduled_at", UtcDateTime()),  # None for a fire by hand or by a queue
    Column("cause", String(16), nullable=False),
    Column("claimed_by", String(32), nullable=False),
    Column("claimed_at", UtcDateTime(), nullable=False),
    Column("fired_at", UtcDateTime()),
    Column("job_id", String(32)),
    Column("skipped", Text()),
    UniqueConstraint("trigger_id", "scheduled_at", name="ux_scheduler_fires_time"),
    Index("ix_scheduler_fires_recent", "trigger_id", "claimed_at"),
    Index(
        "ix_scheduler_fires_unfinished",
        "claimed_at",
        sqlite_where=text(_UNFINISHED_SQL),
        postgresql_where=text(_UNFINISHED_SQL),
    ),
)


@dataclass(frozen=True, slots=True)
class FireRow:
    """One row of `scheduler_fires`."""

    id: str
    tenant: str
    trigger_id: str
    trigger_name: str
    scheduled_at: datetime | None
    cause: str
    claimed_by: str
    claimed_at: datetime
    fired_at: datetime | None = None
    job_id: str | None = None
    skipped: str | None = None

    def info(self) -> FireInfo:
        """The fire as shown."""
        return FireInfo(
            trigger=self.trigger_name,
            scheduled_at=self.scheduled_at,
            fired_at=self.fired_at,
            job_id=self.job_id,
            skipped=self.skipped,
            cause=self.cause,
        )


def _record(row: RowMapping) -> TriggerRecord:
    return TriggerRecord(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        kind=TriggerKind(row["kind"]),
        enabled=bool(row["enabled"]),
        job=TriggerJob.model_validate_json(row["job"]),
        schedule=Schedule.model_validate_json(row["schedule"]) if row["schedule"] else None,
        queue=QueueRule.model_validate_json(row["queue_rule"]) if row["queue_rule"] else None,
        mail=MailRule.model_validate_json(row["mail_rule"]) if row["mail_rule"] else None,
        runs=row["runs"],
        month=row["month"],
        month_runs=row["month_runs"],
        considered_until=row["considered_until"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        updated_at=row["updated_at"],
    )


def _fire(row: RowMapping) -> FireRow:
    return FireRow(**{key: row[key] for key in FireRow.__slots__})


def last_fire(row: RowMapping) -> FireInfo | None:
    """The last fire a trigger row remembers."""
    return FireInfo.model_validate_json(row["last_fire"]) if row["last_fire"] else None


_FINISH = (
    update(fires)
    .where(fires.c.id == bindparam("fire_id"))
    .values(job_id=bindparam("job"), skipped=bindparam("skip"), fired_at=bindparam("at"))
)
_REMEMBER = update(triggers).where(triggers.c.id == bindparam("trigger")).values(last_fire=bindparam("fire"))
_ADVANCE = (
    update(triggers)
    .where(
        triggers.c.id == bindparam("trigger"),
        or_(triggers.c.considered_until.is_(None), triggers.c.considered_until < bindparam("until")),
    )
    .values(considered_until=bindparam("until"))
)
_COUNT = update(triggers).where(triggers.c.id == bindparam("trigger")).values(runs=triggers.c.runs + 1)


class TriggerRepository:
    """Reads and writes the scheduler's tables on a connection the caller holds."""

    # --- triggers ---

    async def insert(self, connection: AsyncConnection, record: TriggerRecord) -> None:
        """Store a new trigger."""
        await connection.execute(
            insert(triggers),
            {
                "id": record.id,
                "tenant": record.tenant,
                "name": record.name,
                "kind": record.kind.value,
                "enabled": record.enabled,
                "job": record.job.model_dump_json(),
                "schedule": record.schedule.model_dump_json() if record.schedule else None,
                "queue_rule": record.queue.model_dump_json() if record.queue else None,
                "mail_rule": record.mail.model_dump_json() if record.mail else None,
                "queue_name": record.queue.queue if record.queue else None,
                "calendar": record.schedule.calendar if record.schedule else None,
                "runs": 0,
                "month": None,
                "month_runs": 0,
                "considered_until": record.considered_until,
                "last_fire": None,
                "created_at": record.created_at,
                "created_by": record.created_by,
                "updated_at": record.updated_at,
            },
        )

    async def by_name(self, connection: AsyncConnection, tenant: str, name: str) -> TriggerRecord | None:
        """The trigger called `name`."""
        row = (
            (await connection.execute(select(triggers).where(triggers.c.tenant == tenant, triggers.c.name == name)))
            .mappings()
            .first()
        )
        return _record(row) if row else None

    async def by_id(self, connection: AsyncConnection, trigger_id: str) -> TriggerRecord | None:
        """The trigger with this id, of any tenant."""
        row = (await connection.execute(select(triggers).where(triggers.c.id == trigger_id))).mappings().first()
        return _record(row) if row else None

    async def listing(self, connection: AsyncConnection, tenant: str) -> list[tuple[TriggerRecord, FireInfo | None]]:
        """The tenant's triggers by name, each with its last fire."""
        query = select(triggers).where(triggers.c.tenant == tenant).order_by(triggers.c.name)
        return [(_record(row), last_fire(row)) for row in (await connection.execute(query)).mappings()]

    async def last_of(self, connection: AsyncConnection, trigger_id: str) -> FireInfo | None:
        """The last fire of one trigger."""
        row = (
            (await connection.execute(select(triggers.c.last_fire).where(triggers.c.id == trigger_id)))
            .mappings()
            .first()
        )
        return last_fire(row) if row else None

    async def enabled(self, connection: AsyncConnection, kind: TriggerKind | None = None) -> list[TriggerRecord]:
        """Every enabled trigger of every tenant (of one kind)."""
        query = select(triggers).where(triggers.c.enabled.is_(True))
        if kind is not None:
            query = query.where(triggers.c.kind == kind.value)
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def versions(self, connection: AsyncConnection, kind: TriggerKind) -> dict[str, datetime | None]:
        """id -> `updated_at` of every enabled trigger of one kind, of every tenant."""
        query = select(triggers.c.id, triggers.c.updated_at).where(
            triggers.c.enabled.is_(True), triggers.c.kind == kind.value
        )
        return {row.id: row.updated_at for row in await connection.execute(query)}

    async def by_ids(self, connection: AsyncConnection, trigger_ids: Sequence[str]) -> list[TriggerRecord]:
        """The triggers with these ids, of any tenant."""
        found: list[TriggerRecord] = []
        for first in range(0, len(trigger_ids), 500):
            query = select(triggers).where(triggers.c.id.in_(trigger_ids[first : first + 500]))
            found += [_record(row) for row in (await connection.execute(query)).mappings()]
        return found

    async def of_queue(self, connection: AsyncConnection, tenant: str, queue: str) -> list[TriggerRecord]:
        """The enabled queue triggers watching `queue`."""
        query = select(triggers).where(
            triggers.c.tenant == tenant, triggers.c.queue_name == queue, triggers.c.enabled.is_(True)
        )
        return [_record(row) for row in (await connection.execute(query)).mappings()]

    async def set_enabled(
        self, connection: AsyncConnection, record: TriggerRecord, enabled: bool, now: datetime
    ) -> bool:
        """Enable or disable a trigger. Enabling considers every fire up to now decided: fires due while
        it was disabled are not made up."""
        values: dict[str, Any] = {"enabled": enabled, "updated_at": now}
        if enabled:
            values["considered_until"] = now
        result = await connection.execute(update(triggers).where(triggers.c.id == record.id).values(**values))
        return result.rowcount == 1

    async def remove(self, connection: AsyncConnection, trigger_id: str) -> None:
        """Delete a trigger and its fires."""
        await connection.execute(delete(fires).where(fires.c.trigger_id == trigger_id))
        await connection.execute(delete(triggers).where(triggers.c.id == trigger_id))

    async def advance(self, connection: AsyncConnection, moves: Sequence[tuple[str, datetime]]) -> None:
        """Record, per trigger, that every scheduled fire up to a moment has been decided (never backwards)."""
        if moves:
            await connection.execute(_ADVANCE, [{"trigger": trigger, "until": until} for trigger, until in moves])

    # --- runs ---

    async def count_runs(self, connection: AsyncConnection, trigger_ids: Sequence[str]) -> None:
        """Count one run for each trigger named (a trigger named twice counts twice)."""
        if trigger_ids:
            await connection.execute(_COUNT, [{"trigger": trigger} for trigger in trigger_ids])

    async def reserve_run(
        self, connection: AsyncConnection, trigger_id: str, month: str, max_runs: int | None, max_per_month: int | None
    ) -> bool:
        """Count one run of a trigger with limits, if it may run one more (in all, and in `month`)."""
        query = update(triggers).where(triggers.c.id == trigger_id)
        if max_runs is not None:
            query = query.where(triggers.c.runs < max_runs)
        if max_per_month is not None:
            query = query.where(
                or_(triggers.c.month.is_(None), triggers.c.month != month, triggers.c.month_runs < max_per_month)
            )
        query = query.values(
            runs=triggers.c.runs + 1,
            month_runs=case((triggers.c.month == month, triggers.c.month_runs + 1), else_=1),
            month=month,
        )
        return (await connection.execute(query)).rowcount == 1

    async def release_runs(self, connection: AsyncConnection, released: Sequence[tuple[str, str | None]]) -> None:
        """Give back runs counted for fires that did not make a job: (trigger, the month it counted in)."""
        for trigger_id, month in released:
            await connection.execute(
                update(triggers)
                .where(triggers.c.id == trigger_id, triggers.c.runs > 0)
                .values(
                    runs=triggers.c.runs - 1,
                    month_runs=case(
                        (and_(triggers.c.month == month, triggers.c.month_runs > 0), triggers.c.month_runs - 1),
                        else_=triggers.c.month_runs,
                    ),
                )
            )

    # --- fires ---

    async def claim(self, connection: AsyncConnection, rows: Sequence[FireRow]) -> set[str]:
        """Insert scheduled fires, each unless another replica did first; the ids of those inserted here."""
        if not rows:
            return set()
        dialect = sqlite if connection.dialect.name == "sqlite" else postgresql
        statement = dialect.insert(fires).on_conflict_do_nothing(index_elements=["trigger_id", "scheduled_at"])
        values = [_fire_values(row) for row in rows]
        result = await connection.execute(statement.returning(fires.c.id), values)
        return {row[0] for row in result}

    async def add_fire(self, connection: AsyncConnection, row: FireRow) -> None:
        """Insert a fire by hand or by a queue (no scheduled time: never in conflict)."""
        await connection.execute(insert(fires), _fire_values(row))

    async def finish(self, connection: AsyncConnection, done: Sequence[FireRow]) -> None:
        """Write how fires ended (their job, or why they skipped), and remember each trigger's last one."""
        if not done:
            return
        await connection.execute(
            _FINISH, [{"fire_id": row.id, "job": row.job_id, "skip": row.skipped, "at": row.fired_at} for row in done]
        )
        last: dict[str, FireRow] = {}
        for row in done:
            last[row.trigger_id] = row
        await connection.execute(
            _REMEMBER, [{"trigger": trigger, "fire": row.info().model_dump_json()} for trigger, row in last.items()]
        )

    async def fire(self, connection: AsyncConnection, fire_id: str) -> FireRow | None:
        """One fire by id."""
        row = (await connection.execute(select(fires).where(fires.c.id == fire_id))).mappings().first()
        return _fire(row) if row else None

    async def recent(self, connection: AsyncConnection, trigger_id: str, limit: int) -> list[FireRow]:
        """A trigger's last fires, newest first."""
        query = (
            select(fires)
            .where(fires.c.trigger_id == trigger_id)
            .order_by(func.coalesce(fires.c.scheduled_at, fires.c.claimed_at).desc(), fires.c.claimed_at.desc())
            .limit(limit)
        )
        return [_fire(row) for row in (await connection.execute(query)).mappings()]

    async def unfinished(self, connection: AsyncConnection, claimed_before: datetime) -> list[FireRow]:
        """Fires claimed before `claimed_before` that neither made a job nor skipped: their claimer
        died, or lost its way to the jobs service."""
        query = select(fires).where(
            fires.c.job_id.is_(None), fires.c.skipped.is_(None), fires.c.claimed_at < claimed_before
        )
        return [_fire(row) for row in (await connection.execute(query.limit(1000))).mappings()]

    async def take_over(self, connection: AsyncConnection, fire: FireRow, instance: str, now: datetime) -> bool:
        """Claim an unfinished fire from the replica that left it, unless another replica did first."""
        result = await connection.execute(
            update(fires)
            .where(
                fires.c.id == fire.id,
                fires.c.claimed_at == fire.claimed_at,
                fires.c.job_id.is_(None),
                fires.c.skipped.is_(None),
            )
            .values(claimed_by=instance, claimed_at=now)
        )
        return result.rowcount == 1

    async def prune(self, connection: AsyncConnection, before: datetime) -> int:
        """Forget decided fires older than `before`."""
        result = await connection.execute(
            delete(fires).where(
                fires.c.claimed_at < before, or_(fires.c.job_id.is_not(None), fires.c.skipped.is_not(None))
            )
        )
        return int(result.rowcount or 0)


def _fire_values(row: FireRow) -> dict[str, Any]:
    return {key: getattr(row, key) for key in FireRow.__slots__}
