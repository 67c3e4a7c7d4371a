"""Pure parts of `herder trigger`: times in the trigger's time zone, run limits, the job and schedule the
options make, the scheduler's refusals in the words of the options, and how triggers and fires are shown."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from herder.cli.app import main
from herder.cli.output import EXIT_USAGE, Failed
from herder.cli.triggers import (
    FIRE_COLUMNS,
    TRIGGER_COLUMNS,
    _as_options,
    build_job,
    build_schedule,
    fire_result,
    fire_row,
    local_time,
    option_of,
    parse_bound,
    run_limit,
    schedule_line,
    target_of,
    trigger_fields,
    trigger_row,
)
from herder.protocol.errors import BadRequest, NotFound
from herder.protocol.jobs import Priority, Strategy, WhenBusy
from herder.protocol.scheduler import FireInfo, MailRule, Misfire, OffDays, QueueRule, Schedule, TriggerInfo, TriggerJob

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "tz", "moment"),
    [
        ("2026-06-01T08:00", "Europe/Moscow", datetime(2026, 6, 1, 5, 0, tzinfo=UTC)),
        ("2026-06-01", "Europe/Moscow", datetime(2026, 5, 31, 21, 0, tzinfo=UTC)),
        ("2026-06-01T08:00", "UTC", datetime(2026, 6, 1, 8, 0, tzinfo=UTC)),
        # Daylight-saving time in Berlin in July: UTC+2.
        ("2026-07-01T08:00", "Europe/Berlin", datetime(2026, 7, 1, 6, 0, tzinfo=UTC)),
        # An offset of its own wins over the trigger's time zone.
        ("2026-06-01T08:00Z", "Europe/Moscow", datetime(2026, 6, 1, 8, 0, tzinfo=UTC)),
        ("2026-06-01T08:00+02:00", "Europe/Moscow", datetime(2026, 6, 1, 6, 0, tzinfo=UTC)),
        ("now", "Europe/Moscow", NOW),
        ("+2h", "Europe/Moscow", NOW + timedelta(hours=2)),
        ("-1d", "UTC", NOW - timedelta(days=1)),
    ],
)
def test_validity_times_are_read_in_the_triggers_time_zone(text: str, tz: str, moment: datetime) -> None:
    parsed = parse_bound(text, what="--valid-from", tz=tz, now=NOW)
    assert parsed == moment and parsed.tzinfo is UTC


def test_a_bad_validity_time_or_zone_says_how_to_write_one() -> None:
    with pytest.raises(Failed, match=r"^--valid-until 'tomorrow' is not a time; write it in ISO 8601") as refused:
        parse_bound("tomorrow", what="--valid-until", tz="UTC")
    assert refused.value.exit_code == EXIT_USAGE
    with pytest.raises(Failed, match=r"^--tz: time zone 'Mars/Olympus' is not an IANA time zone"):
        parse_bound("2026-06-01", what="--valid-from", tz="Mars/Olympus")
    # With an offset of its own, the time needs no zone: the scheduler judges --tz.
    assert parse_bound("2026-06-01T00:00Z", what="--valid-from", tz="Mars/Olympus") == datetime(2026, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize(("text", "seconds"), [(None, None), ("1h30m", 5400.0), ("90s", 90.0), ("2h", 7200.0)])
def test_run_limits_are_durations(text: str | None, seconds: float | None) -> None:
    assert run_limit(text, what="--stop-after") == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("soon", "--abort-after: 'soon' is not a duration"),
        ("0s", "--abort-after must be more than 0s and at most 7d"),
        ("8d", "--abort-after must be more than 0s and at most 7d"),
    ],
)
def test_bad_run_limits_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(Failed, match=message) as refused:
        run_limit(text, what="--abort-after")
    assert refused.value.exit_code == EXIT_USAGE


def test_job_options_make_the_job() -> None:
    job = build_job(
        process="report",
        version="1.2.0",
        group="finance",
        input_json='{"month": "2026-05"}',
        priority=Priority.HIGH,
        stop_after="1h30m",
        abort_after="2h",
        when_busy=WhenBusy.SKIP,
        strategy=Strategy.FEWEST_PENDING,
        max_concurrent=2,
    )
    assert job == TriggerJob(
        process="report",
        version="1.2.0",
        group="finance",
        input={"month": "2026-05"},
        priority=Priority.HIGH,
        stop_after_s=5400,
        timeout_s=7200,
        when_busy=WhenBusy.SKIP,
        strategy=Strategy.FEWEST_PENDING,
        max_concurrent=2,
    )
    assert build_job(process="hello", robot="r1") == TriggerJob(process="hello", robot="r1")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "say where its jobs run: --robot NAME or --group NAME"),
        ({"robot": "r1", "group": "g"}, "say where its jobs run"),
        ({"robot": "r1", "strategy": Strategy.FEWEST_PENDING}, "--strategy fewest-pending chooses among a group"),
    ],
)
def test_a_job_needs_one_target(options: dict[str, Any], message: str) -> None:
    with pytest.raises(Failed, match=message) as refused:
        build_job(process="hello", **options)
    assert refused.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input_json": "[1]"}, "--input: not a JSON object"),
        ({"version": "not a version!"}, "--version: "),
        ({"process": "bad name"}, "--process: "),
    ],
)
def test_a_refused_job_option_is_named(options: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        build_job(**{"process": "hello", "robot": "r1", **options})


def test_schedule_options_make_the_schedule() -> None:
    schedule = build_schedule(
        cron="0 18 L * *",
        tz="Europe/Moscow",
        calendar="holidays",
        off_days=OffDays.MOVE,
        window="22:00-06:00",
        valid_from="2026-06-01",
        valid_until="2027-06-01T00:00Z",
        max_runs=10,
        max_runs_per_month=2,
        misfire=Misfire.FIRE_ONCE,
    )
    assert schedule == Schedule(
        cron="0 18 L * *",
        tz="Europe/Moscow",
        calendar="holidays",
        on_off_day=OffDays.MOVE,
        window="22:00-06:00",
        valid_from=datetime(2026, 5, 31, 21, 0, tzinfo=UTC),
        valid_until=datetime(2027, 6, 1, tzinfo=UTC),
        max_runs=10,
        max_runs_per_month=2,
        misfire=Misfire.FIRE_ONCE,
    )
    working = build_schedule(working_day=3, at="09:00", tz="Europe/Moscow")
    assert (working.working_day, working.at, working.cron) == (3, "09:00", None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "say when it fires: --cron EXPR, or --working-day N --at HH:MM"),
        ({"cron": "* * * * *", "working_day": 2, "at": "09:00"}, "say when it fires"),
        ({"cron": "* * * * *", "at": "09:00"}, "--at goes with --working-day"),
        ({"working_day": 2}, "--working-day needs --at HH:MM"),
        ({"cron": "* * * * *", "off_days": OffDays.MOVE}, "--off-days says what a fire on a calendar's day does"),
        ({"cron": "* * * * *", "valid_from": "soon"}, "--valid-from 'soon' is not a time"),
    ],
)
def test_a_schedule_needs_one_rule(options: dict[str, Any], message: str) -> None:
    with pytest.raises(Failed, match=message) as refused:
        build_schedule(**options)
    assert refused.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"at": "9am"}, "--at: must be a time of day"),
        ({"window": "22-06"}, "--window: must be a daily window"),
        (
            {"valid_from": "2027-01-01", "valid_until": "2026-01-01"},
            "--valid-from must come before --valid-until",
        ),
    ],
)
def test_a_refused_schedule_option_is_named(options: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"working_day": 1, "at": "09:00"} if "at" in options else {"cron": "* * * * *"}
    with pytest.raises(BadRequest, match=message):
        build_schedule(**{**base, **options})


@pytest.mark.parametrize(
    ("field", "option"),
    [
        ("schedule.cron", "--cron"),
        ("schedule.tz", "--tz"),
        ("schedule.on_off_day", "--off-days"),
        ("job.timeout_s", "--abort-after"),
        ("job.input.a", "--input"),
        ("queue.min_items", "--min-items"),
        ("schedule.unknown", "schedule.unknown"),
    ],
)
def test_fields_the_scheduler_names_become_options(field: str, option: str) -> None:
    assert option_of(field) == option


def test_the_schedulers_refusals_are_said_with_the_options() -> None:
    with pytest.raises(BadRequest) as refused, _as_options():
        raise BadRequest("schedule.tz: time zone 'Mars/Olympus' is not an IANA time zone")
    assert refused.value.message == "--tz: time zone 'Mars/Olympus' is not an IANA time zone"
    with pytest.raises(NotFound, match=r"^no process named 'nope'$"), _as_options():
        raise NotFound("no process named 'nope'")


def _trigger(**fields: Any) -> TriggerInfo:
    base: dict[str, Any] = {
        "id": "t" * 32,
        "name": "nightly",
        "tenant": "default",
        "kind": "cron",
        "enabled": True,
        "job": TriggerJob(process="report", robot="r1"),
        "schedule": Schedule(cron="0 2 * * *", tz="Europe/Moscow"),
        "created_at": NOW,
        "created_by": "admin",
    }
    return TriggerInfo.model_validate({**base, **fields})


def test_schedules_and_targets_read_in_one_line() -> None:
    assert schedule_line(_trigger()) == "0 2 * * * (Europe/Moscow)"
    working = _trigger(schedule=Schedule(working_day=3, at="09:00"))
    assert schedule_line(working) == "working day 3 at 09:00 (UTC)"
    queued = _trigger(kind="queue", schedule=None, queue=QueueRule(queue="invoices", min_items=10, max_jobs=2))
    assert schedule_line(queued) == "queue invoices: a job per 10 New items, at most 2 at once"
    mail = MailRule(host="imap.example.com", credential="mailbox", poll_s=60)
    mailed = _trigger(kind="mail", schedule=None, mail=mail)
    assert schedule_line(mailed) == "mail in INBOX at imap.example.com, every 1m"
    assert dict(trigger_fields(mailed))["next fires"] == "when new mail arrives"
    assert target_of(TriggerJob(process="p", robot="r1")) == "robot r1"
    fewest = TriggerJob(process="p", group="finance", strategy=Strategy.FEWEST_PENDING)
    assert target_of(fewest) == "group finance (fewest pending)"


def test_a_fire_says_what_it_made() -> None:
    assert fire_result(None) is None
    assert fire_result(FireInfo(trigger="t", job_id="a" * 32)) == "job aaaaaaaaaaaa"
    assert fire_result(FireInfo(trigger="t", skipped="every robot is busy")) == "skipped: every robot is busy"
    assert fire_result(FireInfo(trigger="t")) == "starting"
    row = fire_row(FireInfo(trigger="t", scheduled_at=NOW, fired_at=NOW, job_id="b" * 32))
    assert row == ("2026-03-01 12:00:00", "2026-03-01 12:00:00", "schedule", "b" * 12, None)
    assert len(row) == len(FIRE_COLUMNS)


def test_fire_times_show_in_utc_and_in_the_triggers_zone() -> None:
    assert local_time(NOW, "UTC") == "2026-03-01 12:00:00 UTC"
    assert local_time(NOW, "Europe/Moscow") == "2026-03-01 12:00:00 UTC (2026-03-01 15:00:00 Europe/Moscow)"
    assert local_time(NOW, "Nowhere/Else") == "2026-03-01 12:00:00 UTC"  # a zone this machine lacks


def test_trigger_rows_fit_their_columns() -> None:
    last = FireInfo(trigger="nightly", scheduled_at=NOW, fired_at=NOW, job_id="c" * 32)
    row = trigger_row(_trigger(next_fires=[NOW + timedelta(days=1)], last_fire=last, runs=4))
    assert len(row) == len(TRIGGER_COLUMNS)
    assert row == (
        "nightly",
        "enabled",
        "report",
        "robot r1",
        "0 2 * * * (Europe/Moscow)",
        "2026-03-02 12:00:00",
        "2026-03-01 12:00:00",
        "job cccccccccccc",
        4,
    )
    assert trigger_row(_trigger(enabled=False))[1:8:5] == ("disabled", None)


def test_a_trigger_shows_every_setting_and_its_next_fires() -> None:
    schedule = Schedule(
        cron="0 2 * * *",
        tz="Europe/Moscow",
        calendar="holidays",
        on_off_day=OffDays.MOVE,
        valid_until=datetime(2027, 1, 1, tzinfo=UTC),
        max_runs=10,
    )
    job = TriggerJob(process="report", robot="r1", input={"a": 1}, stop_after_s=5400, max_concurrent=1)
    nexts = [NOW + timedelta(days=n) for n in range(5)]
    fields = trigger_fields(_trigger(job=job, schedule=schedule, next_fires=nexts, runs=3))
    shown = dict(fields)
    assert shown["process"] == "report (the newest version at each fire)"
    assert shown["input"] == '{"a": 1}' and shown["stop after"] == "1h 30m" and shown["abort after"] == "-"
    assert shown["calendar"] == "holidays (a fire on its days is moved to the next working day)"
    assert shown["valid"] == "until 2027-01-01 00:00:00 UTC (2027-01-01 03:00:00 Europe/Moscow)"
    assert shown["runs"] == "3 jobs made (at most 10 in all)"
    assert shown["max concurrent"].startswith("1 ")
    labels = [label for label, _ in fields]
    at = labels.index("next fires")
    assert labels[at + 1 :] == ["", "", "", ""]
    assert fields[at][1] == "2026-03-01 12:00:00 UTC (2026-03-01 15:00:00 Europe/Moscow)"
    disabled = dict(trigger_fields(_trigger(enabled=False)))
    assert disabled["next fires"] == "none while it is disabled" and disabled["state"] == "disabled"
    ended = dict(trigger_fields(_trigger()))
    assert ended["next fires"].startswith("none: ")


# --- the commands, before they connect ---

MAIL = [
    "trigger",
    "add-mail",
    "m",
    "--host",
    "imap.example.com",
    "--credential",
    "mailbox",
    "--process",
    "p",
    "--robot",
    "r",
]


@pytest.mark.parametrize(
    ("args", "message", "exit_code"),
    [
        (["trigger", "add", "t", "--process", "p", "--robot", "r"], "say when it fires", 2),
        (["trigger", "add", "t", "--process", "p", "--cron", "* * * * *"], "say where its jobs run", 2),
        (
            ["trigger", "add", "t", "--process", "p", "--robot", "r", "--cron", "* * * * *", "--input", "{"],
            "--input",
            1,
        ),
        (["trigger", "add", "bad name", "--process", "p", "--robot", "r", "--cron", "* * * * *"], "NAME: must be", 1),
        (
            ["trigger", "add", "t", "--process", "p", "--robot", "r", "--working-day", "24", "--at", "09:00"],
            "--working-day",
            2,
        ),
        (
            ["trigger", "add-queue", "t", "--queue", "q", "--process", "p", "--robot", "r", "--min-items", "0"],
            "--min-items",
            2,
        ),
        (["trigger", "add-queue", "t", "--queue", "bad queue", "--process", "p", "--robot", "r"], "--queue: ", 1),
        ([*MAIL, "--after", "move"], "needs where the mails go: give --move-to", 1),
        ([*MAIL, "--all-mail"], "would start a job at every poll", 1),
        ([*MAIL, "--poll", "1s"], "--poll", 1),
        ([*MAIL, "--host", "bad host!"], "--host: must be a host name", 1),
    ],
)
def test_bad_command_lines_are_one_line_before_connecting(
    args: list[str],
    message: str,
    exit_code: int,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HERDER_DATA_DIR", str(tmp_path / "no-stack"))  # connecting would fail otherwise
    monkeypatch.setattr("sys.argv", ["herder", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == exit_code
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("herder: ") and message in lines[0], lines


def test_a_refused_option_is_json_under_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HERDER_DATA_DIR", str(tmp_path / "no-stack"))
    args = ["trigger", "add", "t", "--process", "p", "--robot", "r", "--cron", "* * * * *", "--stop-after", "x"]
    monkeypatch.setattr("sys.argv", ["herder", *args, "--json"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == EXIT_USAGE
    error = json.loads(capsys.readouterr().err)["error"]
    assert error == {
        "code": "usage",
        "message": "--stop-after: 'x' is not a duration; write it like 30s, 15m, 2h or 1d",
    }
