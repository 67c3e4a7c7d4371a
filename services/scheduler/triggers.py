"""A trigger as the scheduler holds it, and the pure decisions about it: its timing (from the wire's
`Schedule` and a calendar's days), whether a fire may run under its limits, and how many jobs a
queue trigger starts. No I/O: the service loads, asks, writes and starts jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from herder.protocol.errors import BadRequest
from herder.protocol.jobs import JobStart
from herder.protocol.scheduler import FireInfo, MailRule, QueueRule, Schedule, TriggerInfo, TriggerJob, TriggerKind
from herder.services.scheduler import fires

# Fires older than this when a scheduler first sees them were missed (no scheduler ran): the
# trigger's misfire policy decides them. Younger ones are a scheduler a moment late, and fire.
MISFIRE_GRACE_S = 60.0


@dataclass(frozen=True, slots=True)
class TriggerRecord:
    """One row of `scheduler_triggers`."""

    id: str
    tenant: str
    name: str
    kind: TriggerKind
    enabled: bool
    job: TriggerJob
    created_at: datetime
    schedule: Schedule | None = None
    queue: QueueRule | None = None
    mail: MailRule | None = None
    runs: int = 0
    month: str | None = None  # the calendar month `month_runs` counts (in the trigger's time zone)
    month_runs: int = 0
    # Every scheduled fire up to this moment has been decided (made, skipped or missed).
    considered_until: datetime | None = None
    created_by: str | None = None
    updated_at: datetime | None = None

    def info(self, *, next_fires: list[datetime], last_fire: FireInfo | None) -> TriggerInfo:
        """The trigger as shown."""
        return TriggerInfo(
            id=self.id,
            name=self.name,
            tenant=self.tenant,
            kind=self.kind,
            enabled=self.enabled,
            job=self.job,
            schedule=self.schedule,
            queue=self.queue,
            mail=self.mail,
            runs=self.runs,
            next_fires=next_fires,
            last_fire=last_fire,
            created_at=self.created_at,
            created_by=self.created_by,
            updated_at=self.updated_at,
        )

    @property
    def max_concurrent(self) -> int | None:
        """How many of its jobs may be open at once (a queue trigger's `max_jobs`)."""
        return self.queue.max_jobs if self.queue is not None else self.job.max_concurrent

    def job_start(self, request_id: str | None = None) -> JobStart:
        """The start request of one of this trigger's jobs (under `request_id`, in a batch)."""
        spec = self.job.model_dump(exclude={"max_concurrent"})
        return JobStart(**spec, trigger=self.name, max_concurrent=self.max_concurrent, request_id=request_id)


@dataclass(frozen=True, slots=True)
class Timing:
    """When a cron trigger fires, ready to compute with."""

    schedule: fires.Schedule
    rules: fires.Rules
    misfire: fires.Misfire


def timing(schedule: Schedule, off_days: frozenset[date] = frozenset()) -> Timing:
    """The fire-time computation of `schedule`, with `off_days` from its calendar; `BadRequest` naming
    the field that is wrong and why (an invalid cron expression, time zone or window, or a schedule
    that never fires)."""
    try:
        if schedule.cron is not None:
            computed = fires.cron_schedule(schedule.cron, schedule.tz)
        else:
            assert schedule.working_day is not None and schedule.at is not None
            computed = fires.working_day_schedule(schedule.working_day, schedule.at, schedule.tz)
    except ValueError as exc:
        field = "schedule.tz" if "time zone" in str(exc) else "schedule.cron" if schedule.cron else "schedule.at"
        raise BadRequest(f"{field}: {exc}", details={"field": field}) from None
    try:
        window = fires.Window.parse(schedule.window) if schedule.window else None
    except ValueError as exc:
        raise BadRequest(f"schedule.window: {exc}", details={"field": "schedule.window"}) from None
    rules = fires.Rules(
        valid_from=schedule.valid_from,
        valid_until=schedule.valid_until,
        window=window,
        off_days=off_days,
        on_off_day=schedule.on_off_day,
    )
    return Timing(schedule=computed, rules=rules, misfire=schedule.misfire)


def limit_reason(record: TriggerRecord, moment: datetime, timing_: Timing) -> str | None:
    """Why a fire of `record` at `moment` may not run under the trigger's limits of runs; None when it may."""
    schedule = record.schedule
    if schedule is None:
        return None
    if schedule.max_runs is not None and record.runs >= schedule.max_runs:
        return f"the trigger has run its {schedule.max_runs} runs"
    if schedule.max_runs_per_month is not None:
        month = fires.month_key(moment, timing_.schedule)
        if record.month == month and record.month_runs >= schedule.max_runs_per_month:
            return f"the trigger has run its {schedule.max_runs_per_month} runs of {month}"
    return None


def exhausted(record: TriggerRecord) -> bool:
    """Whether the trigger has run all the runs it may, ever."""
    schedule = record.schedule
    return schedule is not None and schedule.max_runs is not None and record.runs >= schedule.max_runs


def queue_jobs_to_start(rule: QueueRule, new_items: int, open_jobs: int) -> int:
    """How many jobs a queue trigger starts now: one for each whole `min_items` New items (none below
    `min_items`), up to `max_jobs` open at once, counting those already Pending or running."""
    if new_items < rule.min_items:
        return 0
    wanted = min(rule.max_jobs, new_items // rule.min_items)
    return max(wanted - open_jobs, 0)


__all__ = [
    "MISFIRE_GRACE_S",
    "Timing",
    "TriggerRecord",
    "exhausted",
    "limit_reason",
    "queue_jobs_to_start",
    "timing",
]
