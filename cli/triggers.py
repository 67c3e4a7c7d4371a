"""`herder trigger add|add-queue|list|show|enable|disable|remove|fire-now`: jobs started on a schedule
or when a queue fills.

The scheduler service checks what a trigger names (the cron expression, the time zone, the process,
robot, group, queue and calendar) and says what is wrong with the field's name; the CLI says it with
the name of the option that set the field instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer
from pydantic import ValidationError

from herder.cli.context import (
    BundleOption,
    DataDirOption,
    JsonOption,
    Target,
    TokenFileOption,
    UrlOption,
    call,
    resolve,
)
from herder.cli.output import EXIT_ERROR, EXIT_USAGE, Column, WideOption, fail, print_json, print_table, when
from herder.cli.queues import parse_moment, parse_span, refused_options, reworded, span
from herder.protocol.jobs import MAX_INPUT_BYTES, MAX_RUN_S, Priority, Strategy, WhenBusy
from herder.protocol.messages import Model
from herder.protocol.scheduler import (
    DEFAULT_MAIL_POLL_S,
    MAX_CONCURRENT,
    FireInfo,
    MailAfter,
    MailFilters,
    MailRule,
    MailTls,
    Misfire,
    OffDays,
    QueueRule,
    Schedule,
    TriggerAdd,
    TriggerDetails,
    TriggerDisable,
    TriggerEnable,
    TriggerFireNow,
    TriggerInfo,
    TriggerJob,
    TriggerListRequest,
    TriggerRemove,
    TriggerShow,
)
from herder.protocol.values import parse_json_object

M = TypeVar("M", bound=Model)

SHORT_ID = 12
MAX_QUEUE_MIN_ITEMS = 1_000_000
MAX_WORKING_DAY = 23

trigger_app = typer.Typer(
    help="Triggers: start a process on a schedule (cron, or the Nth working day of the month) or when a "
    "queue holds enough New items.",
    no_args_is_help=True,
)

# `trigger list` on a narrow terminal: RUNS goes first, then LAST FIRE and TARGET; the schedule and the
# last result are cut to the room left; NAME, STATE, PROCESS and NEXT FIRE are always whole.
TRIGGER_COLUMNS = (
    Column("NAME"),
    Column("STATE"),
    Column("PROCESS"),
    Column("TARGET", drop=3),
    Column("SCHEDULE", cut=True, min_width=16),
    Column("NEXT FIRE (UTC)"),
    Column("LAST FIRE (UTC)", drop=2),
    Column("LAST RESULT", cut=True, min_width=16),
    Column("RUNS", drop=1),
)
# `trigger show`'s fires, newest first: CAUSE goes first, then SCHEDULED; the reason of a skip is cut.
FIRE_COLUMNS = (
    Column("FIRED (UTC)"),
    Column("SCHEDULED (UTC)", drop=2),
    Column("CAUSE", drop=1),
    Column("JOB"),
    Column("SKIPPED", cut=True, min_width=16),
)

# The option that sets each field, for errors that name what the user typed.
SCHEDULE_OPTIONS = {
    "cron": "--cron",
    "working_day": "--working-day",
    "at": "--at",
    "tz": "--tz",
    "calendar": "--calendar",
    "on_off_day": "--off-days",
    "window": "--window",
    "valid_from": "--valid-from",
    "valid_until": "--valid-until",
    "max_runs": "--max-runs",
    "max_runs_per_month": "--max-runs-per-month",
    "misfire": "--misfire",
}
JOB_OPTIONS = {
    "process": "--process",
    "version": "--version",
    "robot": "--robot",
    "group": "--group",
    "input": "--input",
    "priority": "--priority",
    "timeout_s": "--abort-after",
    "stop_after_s": "--stop-after",
    "when_busy": "--when-busy",
    "strategy": "--strategy",
    "max_concurrent": "--max-concurrent",
}
QUEUE_OPTIONS = {"queue": "--queue", "min_items": "--min-items", "max_jobs": "--max-jobs"}
MAIL_OPTIONS = {
    "host": "--host",
    "port": "--port",
    "tls": "--tls",
    "folder": "--folder",
    "credential": "--credential",
    "filters.subject_contains": "--subject",
    "filters.sender_contains": "--sender",
    "filters.body_contains": "--body",
    "subject_contains": "--subject",
    "sender_contains": "--sender",
    "body_contains": "--body",
    "batch": "--batch",
    "after": "--after",
    "move_to": "--move-to",
    "bucket": "--bucket",
    "poll_s": "--poll",
}
_FIELD_OPTIONS = {"schedule": SCHEDULE_OPTIONS, "job": JOB_OPTIONS, "queue": QUEUE_OPTIONS, "mail": MAIL_OPTIONS}

NameArgument = Annotated[str, typer.Argument(help="The trigger's name.", show_default=False)]

# --- the options of the job a trigger starts (`add` and `add-queue`) ---

ProcessOption = Annotated[str, typer.Option("--process", help="The process the trigger starts.", show_default=False)]
VersionOption = Annotated[
    str | None, typer.Option("--version", help="The version to run (default: the newest at each fire).")
]
RobotOption = Annotated[str | None, typer.Option("--robot", help="Run each job on this unattended robot.")]
GroupOption = Annotated[
    str | None, typer.Option("--group", help="Run each job on any available robot of this group (or --robot).")
]
InputOption = Annotated[
    str | None, typer.Option("--input", metavar="JSON", help="Every job's input: a JSON object, as 'job start' takes.")
]
PriorityOption = Annotated[Priority, typer.Option("--priority", help="Which waiting job a robot takes first.")]
StopAfterOption = Annotated[
    str | None,
    typer.Option(
        "--stop-after",
        metavar="DURATION",
        help="Soft-stop a job once it has been Running this long (90s, 30m, 1h30m): its script sees "
        "should_stop() and ends itself.",
    ),
]
AbortAfterOption = Annotated[
    str | None,
    typer.Option(
        "--abort-after",
        metavar="DURATION",
        help="Hard-stop a job once it has been Running this long (2h, 1h30m), as 'job start --timeout'.",
    ),
]
WhenBusyOption = Annotated[
    WhenBusy,
    typer.Option(
        "--when-busy",
        help="When no robot the job may run on is free: queue the job (it waits as Pending), or skip the fire "
        "(recorded as skipped).",
    ),
]
StrategyOption = Annotated[
    Strategy,
    typer.Option(
        "--strategy",
        help="With --group, when no robot of it is free: wait for the first to free up, or aim the job at the "
        "busy robot with the fewest jobs waiting for it.",
    ),
]
DisabledOption = Annotated[
    bool, typer.Option("--disabled", help="Add the trigger disabled: it fires once 'herder trigger enable' is run.")
]


# --- parsing what people type ---


def zone(tz: str) -> ZoneInfo:
    """The IANA time zone `tz`, or one line (exit 2) saying it is not one."""
    try:
        return ZoneInfo(tz.strip())
    except (ZoneInfoNotFoundError, ValueError):
        fail(f"--tz: time zone {tz!r} is not an IANA time zone (like Europe/Moscow or UTC)", EXIT_USAGE)


def parse_bound(text: str, *, what: str, tz: str, now: datetime | None = None) -> datetime:
    """A trigger's --valid-from or --valid-until: ISO 8601, taken in the trigger's time zone `tz` unless it
    names its offset (`Z`, `+02:00`); a date alone is its midnight; also `now` and `+2h` / `-1d` from
    now. Else one line (exit 2) saying how to write one."""
    stripped = text.strip()
    try:
        parsed = datetime.fromisoformat(stripped)
    except ValueError:
        if stripped == "now" or stripped[:1] in ("+", "-"):
            return parse_moment(stripped, what=what, now=now)
        fail(
            f"{what} {text!r} is not a time; write it in ISO 8601 (2026-06-01T08:00, in --tz unless it says "
            "Z or +02:00) or relative to now (+2h, -1d)",
            EXIT_USAGE,
        )
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone(tz))
    return parsed.astimezone(UTC)


def run_limit(text: str | None, *, what: str) -> float | None:
    """A job's --stop-after or --abort-after, in seconds (None when not given): more than 0 and at most
    a week, or one line (exit 2)."""
    if text is None:
        return None
    seconds = parse_span(text, what=what).total_seconds()
    if not 0 < seconds <= MAX_RUN_S:
        fail(f"{what} must be more than 0s and at most {MAX_RUN_S / 86400:g}d", EXIT_USAGE)
    return seconds


def _validated(build: Callable[[], M], options: dict[str, str]) -> M:
    try:
        return build()
    except ValidationError as exc:
        raise refused_options(exc, options) from None


def build_job(
    *,
    process: str,
    version: str | None = None,
    robot: str | None = None,
    group: str | None = None,
    input_json: str | None = None,
    priority: Priority = Priority.NORMAL,
    stop_after: str | None = None,
    abort_after: str | None = None,
    when_busy: WhenBusy = WhenBusy.QUEUE,
    strategy: Strategy = Strategy.FIRST_FREE,
    max_concurrent: int | None = None,
) -> TriggerJob:
    """The job a trigger starts, from its options; one line naming the option when one is refused."""
    if (robot is None) == (group is None):
        fail("say where its jobs run: --robot NAME or --group NAME (one of them)", EXIT_USAGE)
    if strategy is Strategy.FEWEST_PENDING and group is None:
        fail("--strategy fewest-pending chooses among a group's robots: aim the trigger at --group", EXIT_USAGE)
    job_input = (
        parse_json_object(input_json, what="--input", max_bytes=MAX_INPUT_BYTES) if input_json is not None else {}
    )
    stop_after_s = run_limit(stop_after, what="--stop-after")
    timeout_s = run_limit(abort_after, what="--abort-after")
    return _validated(
        lambda: TriggerJob(
            process=process,
            version=version,
            robot=robot,
            group=group,
            input=job_input,
            priority=priority,
            stop_after_s=stop_after_s,
            timeout_s=timeout_s,
            when_busy=when_busy,
            strategy=strategy,
            max_concurrent=max_concurrent,
        ),
        JOB_OPTIONS,
    )


def build_schedule(
    *,
    cron: str | None = None,
    working_day: int | None = None,
    at: str | None = None,
    tz: str = "UTC",
    calendar: str | None = None,
    off_days: OffDays | None = None,
    window: str | None = None,
    valid_from: str | None = None,
    valid_until: str | None = None,
    max_runs: int | None = None,
    max_runs_per_month: int | None = None,
    misfire: Misfire = Misfire.SKIP,
    now: datetime | None = None,
) -> Schedule:
    """A cron trigger's schedule, from its options; one line naming the option when one is refused."""
    if (cron is None) == (working_day is None):
        fail("say when it fires: --cron EXPR, or --working-day N --at HH:MM (one of them)", EXIT_USAGE)
    if cron is not None and at is not None:
        fail("--at goes with --working-day; a cron expression has its own time of day", EXIT_USAGE)
    if working_day is not None and at is None:
        fail("--working-day needs --at HH:MM, the time of day it fires at", EXIT_USAGE)
    if off_days is not None and calendar is None:
        fail("--off-days says what a fire on a calendar's day does: give the --calendar", EXIT_USAGE)
    starts = parse_bound(valid_from, what="--valid-from", tz=tz, now=now) if valid_from else None
    ends = parse_bound(valid_until, what="--valid-until", tz=tz, now=now) if valid_until else None
    return _validated(
        lambda: Schedule(
            cron=cron,
            working_day=working_day,
            at=at,
            tz=tz,
            calendar=calendar,
            on_off_day=off_days or OffDays.SKIP,
            window=window,
            valid_from=starts,
            valid_until=ends,
            max_runs=max_runs,
            max_runs_per_month=max_runs_per_month,
            misfire=misfire,
        ),
        SCHEDULE_OPTIONS,
    )


def option_of(match_field: str) -> str:
    """The option that sets a field a service names (`schedule.tz` → `--tz`); the field itself when none does."""
    part, _, name = match_field.partition(".")
    return _FIELD_OPTIONS.get(part, {}).get(name.split(".")[0].split("[")[0], match_field)


def _as_options() -> AbstractContextManager[None]:
    """The service's refusals of a trigger, with option names for its field names."""
    return reworded(r"\b(?:schedule|job|queue)\.[a-z_]+", lambda match: option_of(match.group(0)))


# --- showing things ---


def target_of(job: TriggerJob) -> str:
    """Where a trigger's jobs run: `robot r1`, `group finance`."""
    if job.robot is not None:
        return f"robot {job.robot}"
    fewest = " (fewest pending)" if job.strategy is Strategy.FEWEST_PENDING else ""
    return f"group {job.group}{fewest}"


def schedule_line(trigger: TriggerInfo) -> str:
    """When a trigger fires, in one line: `*/5 * * * * * (UTC)`, `working day 3 at 09:00 (Europe/Moscow)`,
    `queue invoices: a job per 10 New items, at most 2 at once`."""
    if trigger.queue is not None:
        rule = trigger.queue
        return f"queue {rule.queue}: a job per {_plural(rule.min_items, 'New item')}, at most {rule.max_jobs} at once"
    if trigger.mail is not None:
        mail = trigger.mail
        return f"mail in {mail.folder} at {mail.host}, every {span(mail.poll_s)}"
    schedule = trigger.schedule
    if schedule is None:
        return "-"
    if schedule.cron is not None:
        return f"{schedule.cron} ({schedule.tz})"
    return f"working day {schedule.working_day} at {schedule.at} ({schedule.tz})"


def fire_result(fire: FireInfo | None) -> str | None:
    """What a fire made: `job 6323f5754021`, `skipped: <why>`, `starting` (not finished yet); None for no fire."""
    if fire is None:
        return None
    if fire.job_id is not None:
        return f"job {fire.job_id[:SHORT_ID]}"
    if fire.skipped is not None:
        return f"skipped: {fire.skipped}"
    return "starting"


def _state(trigger: TriggerInfo) -> str:
    return "enabled" if trigger.enabled else "disabled"


def _fired_at(fire: FireInfo | None) -> datetime | None:
    return None if fire is None else fire.fired_at or fire.scheduled_at


def trigger_row(trigger: TriggerInfo) -> tuple[Any, ...]:
    """A row of `trigger list`."""
    return (
        trigger.name,
        _state(trigger),
        trigger.job.process,
        target_of(trigger.job),
        schedule_line(trigger),
        when(trigger.next_fires[0]) if trigger.next_fires else None,
        when(_fired_at(trigger.last_fire)),
        fire_result(trigger.last_fire),
        trigger.runs,
    )


def fire_row(fire: FireInfo) -> tuple[Any, ...]:
    """A row of `trigger show`'s fires."""
    return (
        when(fire.fired_at),
        when(fire.scheduled_at),
        fire.cause,
        fire.job_id[:SHORT_ID] if fire.job_id else None,
        fire.skipped if fire.job_id is None else None,
    )


def local_time(moment: datetime, tz: str) -> str:
    """A fire time in UTC, and in the trigger's time zone when that is another."""
    shown = f"{when(moment)} UTC"
    if tz == "UTC":
        return shown
    try:
        local = moment.astimezone(ZoneInfo(tz))
    except (ZoneInfoNotFoundError, ValueError):  # this machine lacks the zone the scheduler has
        return shown
    return f"{shown} ({local:%Y-%m-%d %H:%M:%S} {tz})"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _runs(trigger: TriggerInfo) -> str:
    limits = []
    if trigger.schedule is not None and trigger.schedule.max_runs is not None:
        limits.append(f"at most {trigger.schedule.max_runs} in all")
    if trigger.schedule is not None and trigger.schedule.max_runs_per_month is not None:
        limits.append(f"at most {trigger.schedule.max_runs_per_month} a month")
    return f"{trigger.runs} jobs made" + (f" ({', '.join(limits)})" if limits else "")


def _validity(schedule: Schedule) -> str:
    if schedule.valid_from is None and schedule.valid_until is None:
        return "always"
    parts = []
    if schedule.valid_from is not None:
        parts.append(f"from {local_time(schedule.valid_from, schedule.tz)}")
    if schedule.valid_until is not None:
        parts.append(f"until {local_time(schedule.valid_until, schedule.tz)}")
    return " ".join(parts)


def _next_fires(trigger: TriggerInfo) -> list[str]:
    if trigger.queue is not None:
        return ["when the queue holds enough New items"]
    if trigger.mail is not None:
        return ["when new mail arrives"]
    if not trigger.enabled:
        return ["none while it is disabled"]
    if not trigger.next_fires:
        return ["none: its runs, its validity or its calendar and window leave no more"]
    tz = trigger.schedule.tz if trigger.schedule else "UTC"
    return [local_time(moment, tz) for moment in trigger.next_fires]


def trigger_fields(trigger: TriggerInfo) -> list[tuple[str, str]]:
    """Every setting of a trigger as label and text, in the order `trigger show` prints them; a label
    of "" continues the line above."""
    job = trigger.job
    fields = [
        ("name", trigger.name),
        ("kind", trigger.kind.value),
        ("state", _state(trigger)),
        ("process", f"{job.process} {job.version or '(the newest version at each fire)'}"),
        ("target", target_of(job)),
        ("input", json.dumps(job.input)),
        ("priority", job.priority.value),
        ("when busy", "queue the job" if job.when_busy is WhenBusy.QUEUE else "skip the fire"),
        ("stop after", span(job.stop_after_s) if job.stop_after_s else "-"),
        ("abort after", span(job.timeout_s) if job.timeout_s else "-"),
    ]
    if trigger.queue is not None or trigger.mail is not None:
        fields.append(("schedule", schedule_line(trigger)))
    if trigger.schedule is not None:
        schedule = trigger.schedule
        if job.max_concurrent is not None:
            fields.append(("max concurrent", f"{job.max_concurrent} (a fire is skipped while that many run)"))
        fields.append(("schedule", schedule_line(trigger)))
        if schedule.calendar is not None:
            does = "skipped" if schedule.on_off_day is OffDays.SKIP else "moved to the next working day"
            fields.append(("calendar", f"{schedule.calendar} (a fire on its days is {does})"))
        fields += [
            ("window", schedule.window or "-"),
            ("valid", _validity(schedule)),
            ("misfire", schedule.misfire.value),
        ]
    fields.append(("runs", _runs(trigger)))
    fields.append(("created", f"{when(trigger.created_at)} UTC by {trigger.created_by or '-'}"))
    shown = _next_fires(trigger)
    fields.append(("next fires", shown[0]))
    fields += [("", line) for line in shown[1:]]
    return fields


def _print_fields(fields: Sequence[tuple[str, str]]) -> None:
    for label, value in fields:
        print(f"{label:<15} {value}")


def _next_line(trigger: TriggerInfo) -> str:
    if not trigger.enabled:
        return "disabled: it fires once 'herder trigger enable' is run"
    if trigger.queue is not None:
        return f"it starts jobs while queue {trigger.queue.queue} holds New items"
    if trigger.mail is not None:
        return f"it starts jobs when mail arrives in {trigger.mail.folder} at {trigger.mail.host}"
    if not trigger.next_fires:
        return "it fires no more"
    tz = trigger.schedule.tz if trigger.schedule else "UTC"
    return f"next fire {local_time(trigger.next_fires[0], tz)}"


# --- the commands ---


def _add(target: Target, request: TriggerAdd, json_out: bool) -> None:
    with _as_options():
        added = call(target, lambda c: c.request(request))
    if json_out:
        print_json(added)
        return
    job = added.job
    print(f"added trigger {added.name}: {job.process} on {target_of(job)}, {schedule_line(added)}; {_next_line(added)}")


@trigger_app.command("add")
def add(
    name: NameArgument,
    process: ProcessOption,
    cron: Annotated[
        str | None,
        typer.Option(
            "--cron",
            metavar="EXPR",
            help="When it fires: 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first. "
            "'0 6 * * 1-5' is 06:00 on weekdays; 'L' in the day of month is the month's last day "
            "('0 18 L * *'); '*/30 * * * * *' is every 30 seconds.",
        ),
    ] = None,
    working_day: Annotated[
        int | None,
        typer.Option(
            "--working-day",
            metavar="N",
            help="Instead of --cron: the Nth working day of each month (weekends and --calendar days are not "
            "working days), at --at.",
            min=1,
            max=MAX_WORKING_DAY,
        ),
    ] = None,
    at: Annotated[
        str | None, typer.Option("--at", metavar="HH:MM", help="With --working-day: the time of day it fires at.")
    ] = None,
    tz: Annotated[
        str,
        typer.Option(
            "--tz",
            help="The IANA time zone the schedule, --window and --at are read in (Europe/Moscow); daylight-"
            "saving changes are followed.",
        ),
    ] = "UTC",
    robot: RobotOption = None,
    group: GroupOption = None,
    input_json: InputOption = None,
    version: VersionOption = None,
    priority: PriorityOption = Priority.NORMAL,
    max_concurrent: Annotated[
        int | None,
        typer.Option(
            "--max-concurrent",
            metavar="N",
            help="Skip a fire while N of the trigger's jobs are still Pending or running (default: no limit).",
            min=1,
            max=MAX_CONCURRENT,
        ),
    ] = None,
    misfire: Annotated[
        Misfire,
        typer.Option(
            "--misfire",
            help="Fires missed while no scheduler ran (herder was down): skip them, or fire once for all of them.",
        ),
    ] = Misfire.SKIP,
    valid_from: Annotated[
        str | None,
        typer.Option(
            "--valid-from",
            metavar="TIME",
            help="Fire only from this time: ISO 8601, in --tz unless it says Z or +02:00 (2026-06-01, "
            "2026-06-01T08:00), or relative to now (+2h).",
        ),
    ] = None,
    valid_until: Annotated[
        str | None,
        typer.Option("--valid-until", metavar="TIME", help="Fire only before this time (as --valid-from)."),
    ] = None,
    max_runs: Annotated[
        int | None,
        typer.Option("--max-runs", metavar="N", help="Make at most N jobs in all, then fire no more.", min=1),
    ] = None,
    max_runs_per_month: Annotated[
        int | None,
        typer.Option(
            "--max-runs-per-month",
            metavar="N",
            help="Make at most N jobs in each calendar month (of --tz); further fires that month are skipped.",
            min=1,
        ),
    ] = None,
    calendar: Annotated[
        str | None,
        typer.Option(
            "--calendar",
            help="A calendar asset ('herder asset set NAME --type calendar'): its dates are non-working days, "
            "on which a fire is skipped (or moved, --off-days).",
        ),
    ] = None,
    off_days: Annotated[
        OffDays | None,
        typer.Option(
            "--off-days",
            help="With --calendar: what a fire on one of its days does: skip it (the default), or move it to the "
            "next working day, same time.",
        ),
    ] = None,
    window: Annotated[
        str | None,
        typer.Option(
            "--window",
            metavar="HH:MM-HH:MM",
            help="Make jobs only within this daily window of --tz; 22:00-06:00 crosses midnight.",
        ),
    ] = None,
    stop_after: StopAfterOption = None,
    abort_after: AbortAfterOption = None,
    when_busy: WhenBusyOption = WhenBusy.QUEUE,
    strategy: StrategyOption = Strategy.FIRST_FREE,
    disabled: DisabledOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Add a cron trigger: start PROCESS on a schedule (--cron, or --working-day and --at).

    The trigger starts PROCESS on --robot or --group at every fire of --cron (or on the Nth working day of each
    month, --working-day N --at HH:MM), in --tz. Each fire makes one job, whichever scheduler replica makes it,
    or is recorded as skipped with the reason.

    Example: herder trigger add nightly --process report --group finance --cron '0 2 * * 1-5' --tz Europe/Moscow
    """
    job = build_job(
        process=process,
        version=version,
        robot=robot,
        group=group,
        input_json=input_json,
        priority=priority,
        stop_after=stop_after,
        abort_after=abort_after,
        when_busy=when_busy,
        strategy=strategy,
        max_concurrent=max_concurrent,
    )
    schedule = build_schedule(
        cron=cron,
        working_day=working_day,
        at=at,
        tz=tz,
        calendar=calendar,
        off_days=off_days,
        window=window,
        valid_from=valid_from,
        valid_until=valid_until,
        max_runs=max_runs,
        max_runs_per_month=max_runs_per_month,
        misfire=misfire,
    )
    request = _validated(
        lambda: TriggerAdd(name=name, job=job, schedule=schedule, enabled=not disabled), {"name": "NAME"}
    )
    _add(resolve(data_dir, url, token_file, bundle), request, json_out)


@trigger_app.command("add-queue")
def add_queue(
    name: NameArgument,
    queue: Annotated[str, typer.Option("--queue", help="The queue whose New items start jobs.", show_default=False)],
    process: ProcessOption,
    min_items: Annotated[
        int,
        typer.Option(
            "--min-items",
            metavar="N",
            help="Start a job once the queue holds N New items, and one more for every N more.",
            min=1,
            max=MAX_QUEUE_MIN_ITEMS,
        ),
    ] = 1,
    max_jobs: Annotated[
        int,
        typer.Option(
            "--max-jobs",
            metavar="M",
            help="Keep at most M of the trigger's jobs Pending or running at once.",
            min=1,
            max=MAX_CONCURRENT,
        ),
    ] = 1,
    robot: RobotOption = None,
    group: GroupOption = None,
    input_json: InputOption = None,
    version: VersionOption = None,
    priority: PriorityOption = Priority.NORMAL,
    stop_after: StopAfterOption = None,
    abort_after: AbortAfterOption = None,
    when_busy: WhenBusyOption = WhenBusy.QUEUE,
    strategy: StrategyOption = Strategy.FIRST_FREE,
    disabled: DisabledOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Add a queue trigger: start PROCESS while a queue holds New items.

    While --queue holds at least --min-items New items, the trigger starts PROCESS on --robot or --group, one
    job per --min-items items, keeping at most --max-jobs of its jobs Pending or running.

    Example: herder trigger add-queue booking --queue invoices --process book --group finance --min-items 10
    """
    job = build_job(
        process=process,
        version=version,
        robot=robot,
        group=group,
        input_json=input_json,
        priority=priority,
        stop_after=stop_after,
        abort_after=abort_after,
        when_busy=when_busy,
        strategy=strategy,
    )
    rule = _validated(lambda: QueueRule(queue=queue, min_items=min_items, max_jobs=max_jobs), QUEUE_OPTIONS)
    request = _validated(lambda: TriggerAdd(name=name, job=job, queue=rule, enabled=not disabled), {"name": "NAME"})
    _add(resolve(data_dir, url, token_file, bundle), request, json_out)


@trigger_app.command("add-mail")
def add_mail(
    name: NameArgument,
    host: Annotated[str, typer.Option("--host", help="The IMAP server.", show_default=False)],
    credential: Annotated[
        str,
        typer.Option(
            "--credential",
            help="The credential whose username and secret log in to the mailbox ('herder credential set').",
            show_default=False,
        ),
    ],
    process: ProcessOption,
    port: Annotated[
        int | None,
        typer.Option("--port", help="The server's port (default 993 with --tls tls, else 143).", min=1, max=65535),
    ] = None,
    tls: Annotated[
        MailTls, typer.Option("--tls", help="TLS from the first byte (tls), after STARTTLS (starttls), or none.")
    ] = MailTls.TLS,
    folder: Annotated[str, typer.Option("--folder", help="The folder watched.")] = "INBOX",
    subject: Annotated[
        str | None, typer.Option("--subject", help="Only mails whose subject contains this (any case).")
    ] = None,
    sender: Annotated[
        str | None, typer.Option("--sender", help="Only mails whose From (name or address) contains this.")
    ] = None,
    body: Annotated[str | None, typer.Option("--body", help="Only mails whose text contains this.")] = None,
    all_mail: Annotated[
        bool, typer.Option("--all-mail", help="Take read mails too (needs --after move: they leave the folder).")
    ] = False,
    batch: Annotated[
        bool, typer.Option("--batch", help="One job for all the new mails of a poll, not one per mail.")
    ] = False,
    after: Annotated[
        MailAfter, typer.Option("--after", help="Once its job exists, mark the mail read, or move it (--move-to).")
    ] = MailAfter.READ,
    move_to: Annotated[str | None, typer.Option("--move-to", help="The folder mails go to with --after move.")] = None,
    bucket: Annotated[
        str | None,
        typer.Option(
            "--bucket", help="The storage bucket attachments are stored in (without it, only their names and sizes)."
        ),
    ] = None,
    poll: Annotated[
        str, typer.Option("--poll", help="How often to look in the mailbox (30s, 5m; at least 5s).")
    ] = f"{DEFAULT_MAIL_POLL_S:g}s",
    robot: RobotOption = None,
    group: GroupOption = None,
    input_json: InputOption = None,
    version: VersionOption = None,
    priority: PriorityOption = Priority.NORMAL,
    stop_after: StopAfterOption = None,
    abort_after: AbortAfterOption = None,
    when_busy: WhenBusyOption = WhenBusy.QUEUE,
    strategy: StrategyOption = Strategy.FIRST_FREE,
    disabled: DisabledOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Add a mail trigger: start PROCESS for each new mail in an IMAP mailbox.

    Every --poll, the trigger looks in --folder at --host, logging in with --credential; each new mail
    that matches --subject, --sender and --body (unread ones, unless --all-mail) starts PROCESS with the
    mail's sender, subject, date, text and attachments as its input (the job reads them with
    sdk.job_input()["mail"]; the attachments are in --bucket). Once the job exists, the mail is marked
    read or moved. Adding one needs the right to reveal credentials: the trigger logs in with the secret.

    Example: herder trigger add-mail invoices-in --host imap.example.com --credential mailbox --process
    book --group finance --subject invoice --bucket finance --after move --move-to Done
    """
    job = build_job(
        process=process,
        version=version,
        robot=robot,
        group=group,
        input_json=input_json,
        priority=priority,
        stop_after=stop_after,
        abort_after=abort_after,
        when_busy=when_busy,
        strategy=strategy,
    )
    poll_s = parse_span(poll, what="--poll").total_seconds()

    def rule() -> MailRule:
        fields: dict[str, Any] = {
            "host": host,
            "tls": tls,
            "folder": folder,
            "credential": credential,
            "filters": MailFilters(subject_contains=subject, sender_contains=sender, body_contains=body),
            "unread_only": not all_mail,
            "batch": batch,
            "after": after,
            "move_to": move_to,
            "bucket": bucket,
            "poll_s": poll_s,
        }
        if port is not None:
            fields["port"] = port
        return MailRule(**fields)

    mail = _validated(rule, MAIL_OPTIONS)
    request = _validated(lambda: TriggerAdd(name=name, job=job, mail=mail, enabled=not disabled), {"name": "NAME"})
    _add(resolve(data_dir, url, token_file, bundle), request, json_out)


@trigger_app.command("list")
def list_triggers(
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the triggers, by name: what each starts, when it fires next, and what its last fire made."""
    listed = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(TriggerListRequest()))
    if json_out:
        print_json(listed.triggers)
        return
    if not listed.triggers:
        print(
            "no triggers yet; add one with 'herder trigger add NAME', 'add-queue NAME' or 'add-mail NAME'",
            file=sys.stderr,
        )
        return
    print_table(TRIGGER_COLUMNS, [trigger_row(trigger) for trigger in listed.triggers], wide=wide)


@trigger_app.command("show")
def show(
    name: NameArgument,
    wide: WideOption = False,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one trigger: its settings, its next five fire times and its last fires.

    Fire times are in UTC and in the trigger's time zone; each of its last fires (newest first) shows the job
    it made or why it skipped."""
    details: TriggerDetails = call(
        resolve(data_dir, url, token_file, bundle), lambda c: c.request(TriggerShow(name=name))
    )
    if json_out:
        print_json(details)
        return
    _print_fields(trigger_fields(details.trigger))
    print()
    if not details.fires:
        print("no fires yet")
        return
    print_table(FIRE_COLUMNS, [fire_row(fire) for fire in details.fires], wide=wide, title="last fires, newest first")


def _change(
    request: TriggerEnable | TriggerDisable | TriggerRemove,
    target: Target,
    json_out: bool,
    said: Callable[[TriggerInfo], str],
) -> None:
    """Send a change of one trigger; print the trigger (`--json`) or the line `said` makes of it."""
    changed = call(target, lambda c: c.request(request))
    if json_out:
        print_json(changed)
        return
    print(said(changed))


@trigger_app.command("enable")
def enable(
    name: NameArgument,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Let a trigger fire again, from now on (fires due while it was disabled are not made up)."""
    _change(
        TriggerEnable(name=name),
        resolve(data_dir, url, token_file, bundle),
        json_out,
        lambda enabled: f"enabled trigger {enabled.name}; {_next_line(enabled)}",
    )


@trigger_app.command("disable")
def disable(
    name: NameArgument,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Stop a trigger firing until it is enabled again; the jobs it made already go on."""
    _change(
        TriggerDisable(name=name),
        resolve(data_dir, url, token_file, bundle),
        json_out,
        lambda disabled: f"disabled trigger {disabled.name}; the jobs it made go on",
    )


@trigger_app.command("remove")
def remove(
    name: NameArgument,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Remove a trigger and its fire history; the jobs it made go on."""
    _change(
        TriggerRemove(name=name),
        resolve(data_dir, url, token_file, bundle),
        json_out,
        lambda removed: f"removed trigger {removed.name}; the jobs it made go on",
    )


@trigger_app.command("fire-now")
def fire_now(
    name: NameArgument,
    data_dir: DataDirOption = None,
    url: UrlOption = None,
    token_file: TokenFileOption = None,
    bundle: BundleOption = None,
    json_out: JsonOption = False,
) -> None:
    """Fire a trigger now, by hand, whatever its schedule (even when it is disabled).

    Its --max-concurrent (or --max-jobs) still applies; exits 1 when the fire made no job, saying why."""
    fire = call(resolve(data_dir, url, token_file, bundle), lambda c: c.request(TriggerFireNow(name=name)))
    if json_out:
        print_json(fire)
        if fire.job_id is None:
            raise typer.Exit(EXIT_ERROR)
        return
    if fire.job_id is None:
        fail(f"trigger {fire.trigger} fired but made no job: {fire.skipped or 'no reason given'}", EXIT_ERROR)
    print(f"trigger {fire.trigger} fired: job {fire.job_id}")
