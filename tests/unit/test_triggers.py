"""The scheduler's pure decisions about a trigger: its timing from the wire's schedule, its limits of
runs, and how many jobs a queue trigger starts."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from herder.protocol.errors import BadRequest
from herder.protocol.scheduler import QueueRule, Schedule, TriggerJob, TriggerKind
from herder.services.scheduler import fires
from herder.services.scheduler.triggers import TriggerRecord, exhausted, limit_reason, queue_jobs_to_start, timing

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def record(schedule: Schedule | None = None, queue: QueueRule | None = None, **fields: object) -> TriggerRecord:
    return TriggerRecord(
        id="a" * 32,
        tenant="default",
        name="nightly",
        kind=TriggerKind.CRON if schedule is not None else TriggerKind.QUEUE,
        enabled=True,
        job=TriggerJob(process="p", group="pool", max_concurrent=2),
        created_at=NOW,
        schedule=schedule,
        queue=queue,
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("new_items", "open_jobs", "started"),
    [
        (0, 0, 0),  # an empty queue starts nothing
        (4, 0, 0),  # below min_items
        (5, 0, 1),
        (9, 0, 1),  # one job for each whole min_items
        (10, 0, 2),
        (50, 0, 3),  # at most max_jobs
        (50, 2, 1),  # counting those already open
        (50, 3, 0),
        (50, 7, 0),  # more open than allowed (max_jobs lowered): none, never negative
    ],
)
def test_queue_jobs_to_start(new_items: int, open_jobs: int, started: int) -> None:
    assert queue_jobs_to_start(QueueRule(queue="q", min_items=5, max_jobs=3), new_items, open_jobs) == started


def test_timing_names_the_field_that_is_wrong() -> None:
    for schedule, field in [
        (Schedule(cron="70 * * * *"), "schedule.cron"),
        (Schedule(cron="0 6 * * *", tz="Nowhere/City"), "schedule.tz"),
        (Schedule(cron="0 6 * * *", window="25:00-06:00"), "schedule.window"),
        (Schedule(working_day=3, at="24:61"), "schedule.at"),
    ]:
        with pytest.raises(BadRequest) as refused:
            timing(schedule)
        assert refused.value.message.startswith(field + ":"), refused.value.message
        assert refused.value.details["field"] == field


def test_timing_carries_the_calendar_and_the_rules() -> None:
    holiday = date(2026, 3, 9)
    computed = timing(Schedule(cron="0 9 * * 1", tz="Europe/Moscow", on_off_day="move"), frozenset({holiday}))
    after = datetime(2026, 3, 3, tzinfo=UTC)
    # Monday the 9th is a holiday: moved to Tuesday the 10th, 09:00 Moscow time (06:00 UTC).
    assert fires.next_times(computed.schedule, after, 1, rules=computed.rules) == [datetime(2026, 3, 10, 6, tzinfo=UTC)]


def test_limits_of_runs() -> None:
    schedule = Schedule(cron="0 * * * *", max_runs=10, max_runs_per_month=3)
    timing_ = timing(schedule)
    assert limit_reason(record(schedule, runs=2, month="2026-03", month_runs=2), NOW, timing_) is None
    assert "3 runs of 2026-03" in (
        limit_reason(record(schedule, runs=3, month="2026-03", month_runs=3), NOW, timing_) or ""
    )
    # A new month starts the count again.
    assert limit_reason(record(schedule, runs=3, month="2026-02", month_runs=3), NOW, timing_) is None
    assert "its 10 runs" in (limit_reason(record(schedule, runs=10, month="2026-03", month_runs=0), NOW, timing_) or "")
    assert exhausted(record(schedule, runs=10)) and not exhausted(record(schedule, runs=9))


def test_a_job_start_carries_the_trigger_and_its_limit() -> None:
    cron = record(Schedule(cron="0 * * * *"))
    start = cron.job_start()
    assert start.trigger == "nightly" and start.max_concurrent == 2 and start.group == "pool"
    queued = record(queue=QueueRule(queue="q", max_jobs=4))
    assert queued.job_start().max_concurrent == 4  # a queue trigger's max_jobs stands for max_concurrent
